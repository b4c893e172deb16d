"""`tokenselect`: dynamic token-level selection by a soft vote of all heads (TokenSelect, arXiv 2411.02886, §3;
pzs19/TokenSelect `patcher/token_retrieval.py`).

Each step, every query head's attention probabilities over the candidate tokens are summed (the head soft vote) and
the top `budget − n_sink − n_recent` tokens are read, one selection for all heads of the layer (Hs = 1), together
with the first `n_sink` and the last `n_recent` tokens, the two parts merged by LSE. The official defaults are
n_init 128, n_local 512, top_k 2048 (`config/*.yaml`); here the sink and recent counts default to the same
proportions of the budget.

The selection cache (§3.3): when the new query is similar to the one that last selected (cosine of the heads'
concatenated queries >= `reuse_cos`), the previous selection is read again. It is off by default (`reuse_cos=0`), as in
the release. A step on which every batch row reuses its selection skips the vote (`lax.cond`), the scoring of every
cached key that makes a TokenSelect step grow with the context; a row that selects afresh makes the whole batch vote.

Deviations: the official code disables the model's RoPE and rotates the gathered keys at compact positions (sinks,
selected, recent packed in order); effarch's cache holds keys rotated at their true positions, so the selected
tokens keep them. The official scoring pairs query head h with KV head h % Hkv and unscaled logits; here each query
head scores its own GQA KV head with the model's scale.
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection, sink_recent
from effarch.layers.kv_policies.retrieval import voted_top_k

OFFICIAL = (128, 512, 2048)  # n_init, n_local, top_k


@dataclasses.dataclass(frozen=True)
class TokenSelectPolicy(KVPolicy):
    NAME = "tokenselect"
    n_sink: int = -1  # -1: budget · 128 / 2688 (the official n_init share)
    n_recent: int = -1  # -1: budget · 512 / 2688 (the official n_local share)
    reuse_cos: float = 0.0  # selection cache threshold; 0 = off (the release); TokenSelect's paper uses 0.9

    def __post_init__(self):
        super().__post_init__()
        total = sum(OFFICIAL)
        if self.n_sink == -1:
            object.__setattr__(self, "n_sink", self.budget * OFFICIAL[0] // total)
        if self.n_recent == -1:
            object.__setattr__(self, "n_recent", max(1, self.budget * OFFICIAL[1] // total))
        if self.n_sink < 0 or self.n_recent < 0 or self.n_sink + self.n_recent >= self.budget:
            raise PolicyError(f"kv policy tokenselect: n_sink={self.n_sink} + n_recent={self.n_recent} must be >= 0 "
                              f"and leave tokens to select within budget={self.budget}")
        if not 0.0 <= self.reuse_cos <= 1.0:
            raise PolicyError(f"kv policy tokenselect: reuse_cos must be in [0, 1], got {self.reuse_cos}")

    @property
    def top_k(self) -> int:
        return self.budget - self.n_sink - self.n_recent

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        if self.reuse_cos <= 0:
            return {}
        k = min(self.top_k, max_len)
        n_heads = n_kv_heads if n_heads is None else n_heads
        return {"q": jnp.zeros((batch, n_heads * head_dim), jnp.float32), "idx": jnp.zeros((batch, 1, k), jnp.int32),
                "cnt": jnp.zeros((batch, 1), jnp.int32)}

    def select(self, state, q, k_cache, length):
        B = q.shape[0]
        length = jnp.asarray(length, jnp.int32)
        static = sink_recent(B, self.n_sink, self.n_recent, length)

        def vote():
            fresh = voted_top_k(q, k_cache, self.n_sink, self.n_recent, length, self.top_k, n_lists=1)
            return fresh.idx, fresh.cnt

        if self.reuse_cos <= 0:
            return [static, Selection(*vote())], state
        q_flat = q.reshape(B, -1).astype(jnp.float32)
        prev = state["q"]
        cos = jnp.sum(q_flat * prev, -1) / (jnp.linalg.norm(q_flat, axis=-1) * jnp.linalg.norm(prev, axis=-1) + 1e-12)
        # A reused selection lies before the window of the step that made it, so it stays disjoint from the static
        # part as the window moves on.
        reuse = (cos >= self.reuse_cos) & (jnp.sum(state["cnt"], -1) > 0)
        # The vote scores every cached key: skipped when every row reuses its choice (the cache's saving, §3.3).
        fresh_idx, fresh_cnt = jax.lax.cond(jnp.all(reuse), lambda: (state["idx"], state["cnt"]), vote)
        idx = jnp.where(reuse[:, None, None], state["idx"], fresh_idx)
        cnt = jnp.where(reuse[:, None], state["cnt"], fresh_cnt)
        # The cache's query is the one that last selected (not every step's), as in §3.3.
        new_q = jnp.where(reuse[:, None], prev, q_flat)
        return [static, Selection(idx, cnt)], {"q": new_q, "idx": idx, "cnt": cnt}
