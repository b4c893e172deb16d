"""`recycled`: periodic full-attention steps, and in between the top-k tokens of the last full step (Recycled
Attention, arXiv 2411.05787: full-context steps alternate with steps over the tokens the last full step attended to
most; no official code).

Every `stride` decode steps (and at the first one) the step reads the whole cache, and the policy stores, per KV head,
the positions before the current token ranked by that step's attention (summed over the group's query heads). The
steps in between read the tokens generated since that full step (the full step's own token included) and as many of
the stored top-ranked positions as the rest of `budget` allows, so each in-between step reads at most `budget`
tokens; a full step reads the whole cache. A budget that covers the context reads every token at every step.
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import (
    KVPolicy,
    PolicyError,
    Selection,
    attend_parts,
    full_cache,
    head_scores,
    reads_of,
)


@dataclasses.dataclass(frozen=True)
class RecycledPolicy(KVPolicy):
    NAME = "recycled"
    stride: int = 16  # decode steps from one full-attention step to the next

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.stride <= self.budget:
            raise PolicyError(f"kv policy recycled: stride must be in [1, budget={self.budget}] (the tokens since the "
                              f"last full step are read), got {self.stride}")

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        k = min(self.budget, max_len)
        # anchor: position of the last full step's token; far in the past, so that the first decode step is full.
        return {"ranked": jnp.zeros((batch, n_kv_heads, k), jnp.int32),
                "anchor": jnp.full((), -(self.stride + 1), jnp.int32)}

    def _parts(self, state, length):
        """The in-between step's selection: tokens [anchor, length) and the best stored positions that fit."""
        B, Hkv, k = state["ranked"].shape
        anchor = state["anchor"]
        n_new = length - anchor
        recent = anchor + jnp.arange(self.stride, dtype=jnp.int32)
        new = Selection(jnp.broadcast_to(recent, (B, 1, self.stride)), jnp.full((B, 1), n_new, jnp.int32))
        cnt = jnp.clip(jnp.minimum(self.budget - n_new, anchor), 0, k)
        return [new, Selection(state["ranked"], jnp.broadcast_to(cnt, (B, Hkv)).astype(jnp.int32))]

    def select(self, state, q, k_cache, length):
        """The in-between step's selection (a full step is `attend`'s other branch)."""
        return self._parts(state, jnp.asarray(length, jnp.int32)), state

    def attend(self, state, q, k_cache, v_cache, length):
        B, Hq, K = q.shape
        S, Hkv = k_cache.shape[1:3]
        length = jnp.asarray(length, jnp.int32)

        def full(state):
            o = full_cache(q, k_cache, v_cache, length, self.implementation)
            # Rank the positions before the current token by this step's attention, summed over each group.
            s = head_scores(q, k_cache).reshape(B, Hkv, Hq // Hkv, S) * K**-0.5
            s = jnp.where((jnp.arange(S) < length - 1)[None, None, None, :], s, -jnp.inf)
            p = jnp.sum(jax.nn.softmax(jnp.where(jnp.isfinite(s), s, -1e30), axis=-1), axis=2)
            p = jnp.where((jnp.arange(S) < length - 1)[None, None, :], p, -1.0)  # never ranked above a real one
            _, ranked = jax.lax.top_k(p, state["ranked"].shape[-1])
            return o, {"ranked": ranked.astype(jnp.int32), "anchor": length - 1}, length.astype(jnp.float32)

        def partial(state):
            parts = self._parts(state, length)
            o, _ = attend_parts(parts, q, k_cache, v_cache, length, self.implementation)
            return o, state, reads_of(parts, length)

        return jax.lax.cond(length - state["anchor"] > self.stride, full, partial, state)
