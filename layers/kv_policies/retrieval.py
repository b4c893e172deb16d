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
        B, Hq, K = q.shape
        S, Hkv = k_cache.shape[1:3]
        length = jnp.asarray(length, jnp.int32)
        static = sink_recent(B, self.n_sink, self.n_recent, length)
        # Candidates: positions in [n_sink, length − n_recent), the part the static window leaves out.
        lo = jnp.minimum(self.n_sink, length)
        hi = jnp.maximum(length - self.n_recent, lo)
        pos = jnp.arange(S, dtype=jnp.int32)
        cand = (pos >= lo) & (pos < hi)
        s = jnp.einsum("BHGK,BSHK->BHGS", q.reshape(B, Hkv, Hq // Hkv, K), k_cache.astype(q.dtype),
                       preferred_element_type=jnp.float32) * K**-0.5
        s = jnp.where(cand[None, None, None, :], s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        vote = jax.nn.logsumexp(s - lse, axis=2)  # log Σ_group softmax: finite on candidates, -inf elsewhere
        k = min(self.top_k, S)
        _, top = jax.lax.top_k(vote, k)  # [B, Hkv, k]; the candidates come first
        cnt = jnp.broadcast_to(jnp.minimum(k, hi - lo), (B, Hkv)).astype(jnp.int32)
        return [static, Selection(top.astype(jnp.int32), cnt)], state
