"""`retrieval`: top-k retrieval of keys plus a static sink + recent window, merged by LSE (RetrievalAttention, arXiv
2409.10516, §3: a static GPU-resident part, sinks and a recent window, and tokens retrieved by nearest-neighbour
search over the other keys, the two attentions combined by their log-sum-exp).

Two indexes (`index=`):
- "exact": the oracle of the paper's approximate index. The retrieved tokens are the top `budget − n_sink −
  n_recent` keys by attention among those outside the static part. The search scores every key (what an index exists
  to avoid, and not counted in the reads); the attention then reads only the budget.
- "ivf": the scalable variant, an inverted-file index per KV head standing in for the paper's attention-aware ANNS
  index (§3.2). At prefill (the first cache write of more than one token) the written keys are clustered by k-means
  (Lloyd, L2, `KMEANS_ITERS` iterations from evenly spaced keys) into `nlist` centroids per KV head and batch row; every
  key belongs to the list of its nearest centroid, and a key written later (at decode) joins the list of its nearest
  centroid (it is read through the recent window until it leaves it, then through its list: the candidates exclude the
  window). A step scores the centroids with the query (a GQA group votes as below), scans the `nprobe` best lists and
  retrieves their top keys. The reads count the index honestly, in KV-token units where a key alone is half a token
  (K and V rows have the same width): attended tokens + (nlist centroids + the scanned list members) / 2. The XLA
  path computes the scan as a mask over the cache (same result, not O(scanned) compute): the reads are what an IVF
  index would touch. With nprobe = nlist the selection is exact's.

One selection per KV head (Hs = Hkv): a GQA group's query heads vote with their attention probabilities (the sum of
each head's softmax over the candidates), so with one query head per KV head it is exactly the top-k of q·k. A budget
that covers the context reads every token (ivf then skips its index).
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import (
    KVPolicy,
    PolicyError,
    Selection,
    attend_parts,
    head_scores,
    reads_of,
    sink_recent,
)

KMEANS_ITERS = 10  # Lloyd iterations at prefill
INDEXES = ("exact", "ivf")


@dataclasses.dataclass(frozen=True)
class RetrievalPolicy(KVPolicy):
    NAME = "retrieval"
    n_sink: int = 4
    n_recent: int = -1  # -1: budget // 4
    index: str = "exact"  # "exact" top-k, or "ivf" (k-means lists, nprobe of them scanned)
    nlist: int = 16  # ivf: lists (centroids) per KV head
    nprobe: int = 4  # ivf: lists scanned per step

    def __post_init__(self):
        super().__post_init__()
        if self.n_recent == -1:
            object.__setattr__(self, "n_recent", self.budget // 4)
        if self.n_sink < 0 or self.n_recent < 0 or self.n_sink + self.n_recent >= self.budget:
            raise PolicyError(f"kv policy retrieval: n_sink={self.n_sink} + n_recent={self.n_recent} must be >= 0 "
                              f"and leave tokens to retrieve within budget={self.budget}")
        if self.index not in INDEXES:
            raise PolicyError(f"kv policy retrieval: index must be exact or ivf, got {self.index!r}")
        if not 1 <= self.nprobe <= self.nlist:
            raise PolicyError(f"kv policy retrieval: need 1 <= nprobe <= nlist, got nprobe={self.nprobe}, "
                              f"nlist={self.nlist}")

    @property
    def top_k(self) -> int:
        return self.budget - self.n_sink - self.n_recent

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        if self.index == "exact":
            return {}
        return {"centroids": jnp.zeros((batch, n_kv_heads, self.nlist, head_dim), jnp.float32),
                "assign": jnp.full((batch, n_kv_heads, max_len), -1, jnp.int32)}

    def update(self, state, k_new, pos):
        if self.index == "exact":
            return state
        k_BHTK = jnp.swapaxes(k_new.astype(jnp.float32), 1, 2)
        if k_new.shape[1] > 1:  # prefill: build the index from these keys when they start the cache
            centroids = jax.lax.cond(jnp.asarray(pos) == 0, lambda: kmeans(k_BHTK, self.nlist),
                                     lambda: state["centroids"])
        else:
            centroids = state["centroids"]
        lists = nearest(k_BHTK, centroids)
        return {"centroids": centroids,
                "assign": jax.lax.dynamic_update_slice(state["assign"], lists, (0, 0, jnp.asarray(pos, jnp.int32)))}

    def _select(self, state, q, k_cache, length):
        """(parts, index reads): the index reads are ivf's key-only reads in KV tokens (module docstring), 0 for exact
        and where the budget covers the candidates."""
        B, Hq, K = q.shape
        Hkv = k_cache.shape[2]
        length = jnp.asarray(length, jnp.int32)
        static = sink_recent(B, self.n_sink, self.n_recent, length)
        if self.index == "exact":
            return [static, voted_top_k(q, k_cache, self.n_sink, self.n_recent, length, self.top_k,
                                        n_lists=Hkv)], jnp.zeros((), jnp.float32)
        lo = jnp.minimum(self.n_sink, length)
        hi = jnp.maximum(length - self.n_recent, lo)
        covers = hi - lo <= self.top_k  # the budget holds every candidate: no search
        s = jnp.einsum("BHGK,BHCK->BHGC", q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, K), state["centroids"])
        _, probe = jax.lax.top_k(group_vote(s * K**-0.5), self.nprobe)  # [B, Hkv, nprobe]
        probed = jnp.any(state["assign"][..., None] == probe[:, :, None, :], axis=-1)  # [B, Hkv, S]
        pos = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
        cand = (pos >= lo) & (pos < hi)
        scanned = jnp.mean(jnp.sum(probed & cand[None, None, :], axis=-1).astype(jnp.float32))  # mean over lists
        index_reads = jnp.where(covers, 0.0, 0.5 * (self.nlist + scanned))  # a key alone: half a KV token
        return [static, voted_top_k(q, k_cache, self.n_sink, self.n_recent, length, self.top_k, n_lists=Hkv,
                                    allowed=probed | covers)], index_reads

    def select(self, state, q, k_cache, length):
        return self._select(state, q, k_cache, length)[0], state

    def attend(self, state, q, k_cache, v_cache, length):
        parts, index_reads = self._select(state, q, k_cache, length)
        o, _ = attend_parts(parts, q, k_cache, v_cache, length, self.implementation)
        return o, state, reads_of(parts, length) + index_reads


def kmeans(x: jax.Array, n: int, iters: int = KMEANS_ITERS) -> jax.Array:
    """Centroids [B, H, n, K] of the points x [B, H, T, K] by Lloyd's k-means (L2), started from n evenly spaced
    points; an empty cluster keeps its centroid."""
    T = x.shape[2]
    c = x[:, :, jnp.linspace(0, T - 1, n).round().astype(jnp.int32)]

    def step(c, _):
        onehot = jax.nn.one_hot(nearest(x, c), n, dtype=x.dtype)  # [B, H, T, n]
        sums = jnp.einsum("BHTC,BHTK->BHCK", onehot, x)
        counts = jnp.sum(onehot, axis=2)[..., None]
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c), None

    return jax.lax.scan(step, c, None, length=iters)[0]


def nearest(x: jax.Array, c: jax.Array) -> jax.Array:
    """The nearest centroid (L2) of every point: x [B, H, T, K], c [B, H, n, K] -> int32 [B, H, T]."""
    d = jnp.sum(c * c, axis=-1)[:, :, None, :] - 2 * jnp.einsum("BHTK,BHCK->BHTC", x, c)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def group_vote(s: jax.Array) -> jax.Array:
    """A GQA group's soft vote: s [B, L, G, N] scaled logits of G query heads -> log Σ_g softmax_g(s) [B, L, N]
    (-inf where every head's logit is -inf)."""
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jax.nn.logsumexp(s - lse, axis=2)


def voted_top_k(q, k_cache, n_sink: int, n_recent: int, length, k: int, *, n_lists: int,
                allowed=None) -> Selection:
    """The top-k positions in [n_sink, length − n_recent) (what `sink_recent` leaves out) by the attention of q:
    n_lists = Hkv votes per GQA group, 1 over all heads. A list's vote for a position is log Σ_h softmax_h, the sum of
    its query heads' attention probabilities over the candidates (the soft vote); with one head per list, the top-k
    of q·k. `allowed` [B, n_lists, S] (bool) narrows the candidates (ivf's probed lists). cnt = min(k, candidates),
    the best first."""
    B, Hq, K = q.shape
    S, Hkv = k_cache.shape[1:3]
    lo = jnp.minimum(n_sink, length)
    hi = jnp.maximum(length - n_recent, lo)
    pos = jnp.arange(S, dtype=jnp.int32)
    cand = (pos >= lo) & (pos < hi)
    s = head_scores(q, k_cache).reshape(B, Hkv, Hq // Hkv, S) * K**-0.5
    s = jnp.where(cand[None, None, None, :], s, -jnp.inf).reshape(B, n_lists, Hq // n_lists, S)
    if allowed is not None:
        s = jnp.where(allowed[:, :, None, :], s, -jnp.inf)
    vote = group_vote(s)  # finite on candidates, -inf elsewhere
    k = min(k, S)
    _, top = jax.lax.top_k(vote, k)  # [B, n_lists, k]; the candidates come first
    if allowed is None:
        n_cand = jnp.broadcast_to(hi - lo, (B, n_lists))
    else:
        n_cand = jnp.sum(allowed & cand[None, None, :], axis=-1)
    return Selection(top.astype(jnp.int32), jnp.minimum(k, n_cand).astype(jnp.int32))
