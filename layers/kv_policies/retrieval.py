"""`retrieval`: exact top-k retrieval of keys plus a static sink + recent window, merged by LSE (RetrievalAttention,
arXiv 2409.10516, §3: a static GPU-resident part, sinks and a recent window, and tokens retrieved by nearest-neighbour
search over the other keys, the two attentions combined by their log-sum-exp).

This is the exact variant, the oracle of the paper's approximate index: the retrieved tokens are the top
`budget − n_sink − n_recent` keys by attention among those outside the static part. The search reads every key's
logit (what an index exists to avoid); the attention then reads only the budget. One selection per KV head (Hs =
Hkv): a GQA group's query heads vote with their attention probabilities (the sum of each head's softmax over the
candidates), so with one query head per KV head it is exactly the top-k of q·k.
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection, sink_recent


@dataclasses.dataclass(frozen=True)
class RetrievalPolicy(KVPolicy):
    NAME = "retrieval"
    n_sink: int = 4
    n_recent: int = -1  # -1: budget // 4

    def __post_init__(self):
        super().__post_init__()
        if self.n_recent == -1:
            object.__setattr__(self, "n_recent", self.budget // 4)
        if self.n_sink < 0 or self.n_recent < 0 or self.n_sink + self.n_recent >= self.budget:
            raise PolicyError(f"kv policy retrieval: n_sink={self.n_sink} + n_recent={self.n_recent} must be >= 0 "
                              f"and leave tokens to retrieve within budget={self.budget}")

    @property
    def top_k(self) -> int:
        return self.budget - self.n_sink - self.n_recent

    def select(self, state, q, k_cache, length):
        length = jnp.asarray(length, jnp.int32)
        static = sink_recent(q.shape[0], self.n_sink, self.n_recent, length)
        return [static, voted_top_k(q, k_cache, self.n_sink, self.n_recent, length, self.top_k,
                                    n_lists=k_cache.shape[2])], state


def voted_top_k(q, k_cache, n_sink: int, n_recent: int, length, k: int, *, n_lists: int) -> Selection:
    """The top-k positions in [n_sink, length − n_recent) (what `sink_recent` leaves out) by the attention of q:
    n_lists = Hkv votes per GQA group, 1 over all heads. A list's vote for a position is log Σ_h softmax_h, the sum of
    its query heads' attention probabilities over the candidates (the soft vote); with one head per list, the top-k
    of q·k. cnt = min(k, candidates), the best first."""
    B, Hq, K = q.shape
    S, Hkv = k_cache.shape[1:3]
    lo = jnp.minimum(n_sink, length)
    hi = jnp.maximum(length - n_recent, lo)
    pos = jnp.arange(S, dtype=jnp.int32)
    cand = (pos >= lo) & (pos < hi)
    s = jnp.einsum("BHGK,BSHK->BHGS", q.reshape(B, Hkv, Hq // Hkv, K), k_cache.astype(q.dtype),
                   preferred_element_type=jnp.float32) * K**-0.5
    s = jnp.where(cand[None, None, None, :], s, -jnp.inf).reshape(B, n_lists, Hq // n_lists, S)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    vote = jax.nn.logsumexp(s - lse, axis=2)  # finite on candidates, -inf elsewhere
    k = min(k, S)
    _, top = jax.lax.top_k(vote, k)  # [B, n_lists, k]; the candidates come first
    cnt = jnp.broadcast_to(jnp.minimum(k, hi - lo), (B, n_lists)).astype(jnp.int32)
    return Selection(top.astype(jnp.int32), cnt)
