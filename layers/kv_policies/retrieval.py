"""`retrieval`: top-k retrieval of keys plus a static sink + recent window, merged by LSE (RetrievalAttention, arXiv
2409.10516, §3: a static GPU-resident part, sinks and a recent window, and tokens retrieved by nearest-neighbour
search over the other keys, the two attentions combined by their log-sum-exp).

Two indexes (`index=`):
- "exact": the oracle of the paper's approximate index. The retrieved tokens are the top `budget − n_sink −
  n_recent` keys by attention among those outside the static part. The search scores every key (what an index exists
  to avoid, and not counted in the reads); the attention then reads only the budget. Its step time grows with the
  context, as the scoring of every key does.
- "ivf": the scalable variant, an inverted-file index per KV head standing in for the paper's attention-aware ANNS
  index (§3.2; layers/kv_policies/ivf.py): k-means centroids fitted on the first cache write (the prefill), every key
  stored in a fixed-capacity list (its nearest list with room), keys written at decode added the same way (a key is
  read through the recent window until it leaves it, then through its list: the candidates exclude the window). A
  step scores the centroids with the query (a GQA group votes as below), gathers the members of the `nprobe` best
  lists and retrieves their top keys. `nlist=0` (the default) gives one list per `list_size` cache slots, so the
  lists keep their size and a step's search stays the same size as the context grows (kv_policy_decode.py measures
  it); `nlist=N` fixes the count. Lists hold `slack` times their mean size. The reads count the index honestly, in
  KV-token units where a key alone is half a token (K and V rows have the same width): attended tokens + (centroids
  + the scanned list members among the candidates) / 2. With nprobe = nlist the selection is exact's.

One selection per KV head (Hs = Hkv): a GQA group's query heads vote with their attention probabilities (the sum of
each head's softmax over the candidates), so with one query head per KV head it is exactly the top-k of q·k. A budget
that covers the context reads every token (ivf then skips its index).
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies import ivf
from effarch.layers.kv_policies.base import (
    KVPolicy,
    PolicyError,
    Selection,
    attend_parts,
    head_scores,
    reads_of,
    sink_recent,
)

INDEXES = ("exact", "ivf")


@dataclasses.dataclass(frozen=True)
class RetrievalPolicy(KVPolicy):
    NAME = "retrieval"
    n_sink: int = 4
    n_recent: int = -1  # -1: budget // 4
    index: str = "exact"  # "exact" top-k, or "ivf" (k-means lists, nprobe of them scanned)
    nlist: int = 0  # ivf: lists (centroids) per KV head; 0 = one per list_size cache slots
    nprobe: int = 4  # ivf: lists scanned per step
    list_size: int = 64  # ivf with nlist=0: cache slots per list
    slack: float = 2.0  # ivf: a list holds slack times the mean list size

    def __post_init__(self):
        super().__post_init__()
        if self.n_recent == -1:
            object.__setattr__(self, "n_recent", self.budget // 4)
        if self.n_sink < 0 or self.n_recent < 0 or self.n_sink + self.n_recent >= self.budget:
            raise PolicyError(f"kv policy retrieval: n_sink={self.n_sink} + n_recent={self.n_recent} must be >= 0 "
                              f"and leave tokens to retrieve within budget={self.budget}")
        if self.index not in INDEXES:
            raise PolicyError(f"kv policy retrieval: index must be exact or ivf, got {self.index!r}")
        if self.nlist < 0 or self.nprobe < 1 or (self.nlist and self.nprobe > self.nlist):
            raise PolicyError(f"kv policy retrieval: need nlist >= 0 (0: one per list_size slots) and 1 <= nprobe "
                              f"<= nlist, got nprobe={self.nprobe}, nlist={self.nlist}")
        if self.list_size < 1 or self.slack < 1:
            raise PolicyError(f"kv policy retrieval: need list_size >= 1 and slack >= 1 (every key must fit a list), "
                              f"got list_size={self.list_size}, slack={self.slack}")

    @property
    def top_k(self) -> int:
        return self.budget - self.n_sink - self.n_recent

    def n_lists(self, max_len: int) -> int:
        return self.nlist or max(1, -(-max_len // self.list_size))

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        if self.index == "exact":
            return {}
        n = self.n_lists(max_len)
        return ivf.init_index(batch, n_kv_heads, head_dim, n, ivf.capacity(max_len, n, self.slack))

    def update(self, state, k_new, pos):
        return state if self.index == "exact" else ivf.add_keys(state, k_new, pos)

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
        q_BHGK = q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, K)
        s = jnp.einsum("BHGK,BHCK->BHGC", q_BHGK, state["centroids"])
        members = ivf.probe(state, group_vote(s * K**-0.5), self.nprobe)  # [B, Hkv, M]: positions, −1 empty
        valid = (members >= lo) & (members < hi)  # candidates only (the window and sinks are the static part)
        keys = k_cache[jnp.arange(B)[:, None, None], jnp.maximum(members, 0), jnp.arange(Hkv)[None, :, None]]
        s = jnp.einsum("BHGK,BHMK->BHGM", q_BHGK, keys.astype(jnp.float32)) * K**-0.5
        vote = group_vote(jnp.where(valid[:, :, None, :], s, -jnp.inf))  # [B, Hkv, M]
        k = self.top_k
        _, top = jax.lax.top_k(vote, min(k, members.shape[-1]))  # the valid ones first
        found = jnp.take_along_axis(members, top, axis=-1)
        found = jnp.pad(found, ((0, 0), (0, 0), (0, k - found.shape[-1])))
        n_valid = jnp.sum(valid, axis=-1)
        # A budget that holds every candidate reads them all, without the index.
        covers = hi - lo <= k
        idx = jnp.where(covers, lo + jnp.arange(k, dtype=jnp.int32), found)
        cnt = jnp.where(covers, hi - lo, jnp.minimum(k, n_valid))
        scanned = jnp.mean(n_valid.astype(jnp.float32))  # mean over lists
        index_reads = jnp.where(covers, 0.0, 0.5 * (state["centroids"].shape[2] + scanned))  # a key alone: half
        return [static, Selection(idx.astype(jnp.int32), cnt.astype(jnp.int32))], index_reads

    def select(self, state, q, k_cache, length):
        return self._select(state, q, k_cache, length)[0], state

    def attend(self, state, q, k_cache, v_cache, length):
        parts, index_reads = self._select(state, q, k_cache, length)
        o, _ = attend_parts(parts, q, k_cache, v_cache, length, self.implementation)
        return o, state, reads_of(parts, length) + index_reads


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
