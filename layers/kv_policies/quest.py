"""`quest`: query-aware page selection from per-page key bounds (Quest, arXiv 2406.10774, §3; mit-han-lab/Quest
`evaluation/quest_attention.py`).

The cache is split into pages of `page` tokens aligned at position 0. For each page p the policy keeps the
element-wise max and min of its (rotated) keys, updated as tokens are written. At a decode step, query head h scores
page p by the upper bound of q·k over the page,

    bound(h, p) = Σ_d max(q_d · kmax[p, d], q_d · kmin[p, d]) = [q⁺, −q⁻] · [kmax[p], −kmin[p]]

(q⁺ = max(q, 0), q⁻ = min(q, 0): kmax >= kmin, so the sign of q_d picks the term). The state keeps the stacked
bounds [kmax; −kmin] (both running maxima) channel-major, [B, Hkv, 2K, pages], so a decode step scores every page of
a KV head with one [G, 2K] x [2K, pages] matrix product, a single pass over 2 / page of the keys' bytes without a
transpose (per-step work that grows with the context, but at an eighth of the key bytes for pages of 16), and reads
the top pages by bound, one list per query head (Hs = Hq, as Quest; a GQA group loads the union). The current page
(the one holding the new token, often partial) is always read: Quest scores it like the others, but reading it
outright keeps the budget exact: the current page's r tokens plus floor((budget − r) / page) whole pages, at most
`budget` tokens (Quest's own floor of 3 pages can exceed small budgets). A budget that covers the context reads
every page, i.e. the full cache. Quest keeps layers 0 and 1 dense (`dense_layers=2` here; the default is 0).

`every=N` scores the pages on every N-th decode step only (Quest selects at every step: N = 1, the default); the
steps in between read the pages chosen last, best first as many as fit beside the current page, and skip the scan
(`lax.cond`), so the scan's cost, the only part of a step that grows with the context, is paid once per N steps. A
page completed since the last choice is not read until the next one.
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection


@dataclasses.dataclass(frozen=True)
class QuestPolicy(KVPolicy):
    NAME = "quest"
    page: int = 16  # Quest's --chunk_size
    every: int = 1  # score the pages every N decode steps (1: Quest's every step)

    def __post_init__(self):
        super().__post_init__()
        if self.page < 1 or self.budget < self.page:
            raise PolicyError(f"kv policy quest: page must be in [1, budget={self.budget}] (the current page is "
                              f"always read), got page={self.page}")
        if self.every < 1:
            raise PolicyError(f"kv policy quest: every must be >= 1 (decode steps between choices), got {self.every}")

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        n_pages = -(-max_len // self.page)
        state = {"bounds": jnp.full((batch, n_kv_heads, 2 * head_dim, n_pages), -jnp.inf, jnp.float32)}
        if self.every > 1:  # the last choice (best first) and the decode steps since
            n_heads = n_kv_heads if n_heads is None else n_heads
            state["top"] = jnp.zeros((batch, n_heads, min(self.budget // self.page, n_pages)), jnp.int32)
            state["n_chosen"] = jnp.zeros((), jnp.int32)  # the valid entries of "top" (complete pages then)
            state["steps"] = jnp.zeros((), jnp.int32)
        return state

    def update(self, state, k_new, pos):
        k32 = k_new.astype(jnp.float32)
        both = jnp.transpose(jnp.concatenate([k32, -k32], axis=-1), (0, 2, 3, 1))  # [B, Hkv, 2K, T]
        if k_new.shape[1] == 1:  # a decode step: one page's column, read and written in place
            at = (0, 0, 0, jnp.asarray(pos, jnp.int32) // self.page)
            column = jnp.maximum(jax.lax.dynamic_slice(state["bounds"], at, both.shape), both)
            # Without the barrier XLA's CPU compiler fuses the write into both the bounds' product and the state it
            # returns, and copies every page's bounds to do it: O(context) per step.
            bounds = jax.lax.optimization_barrier(jax.lax.dynamic_update_slice(state["bounds"], column, at))
            return {**state, "bounds": bounds}
        pages = (pos + jnp.arange(k_new.shape[1], dtype=jnp.int32)) // self.page
        return {**state, "bounds": state["bounds"].at[..., pages].max(both)}

    @staticmethod
    def kmax_kmin(state):
        """(kmax, kmin) [B, Hkv, K, pages] of the state (unwritten pages: −inf, +inf)."""
        K = state["bounds"].shape[2] // 2
        return state["bounds"][:, :, :K], -state["bounds"][:, :, K:]

    def page_bounds(self, state, q):
        """bound [B, Hq, nP] of every page for every query head (pages never written: NaN or ±inf, mask them)."""
        B, Hq, K = q.shape
        Hkv = state["bounds"].shape[1]
        q_BHGK = q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, K)
        q_signed = jnp.concatenate([jnp.maximum(q_BHGK, 0.0), -jnp.minimum(q_BHGK, 0.0)], axis=-1)
        bound = jnp.einsum("BHGK,BHKP->BHGP", q_signed, state["bounds"], precision="highest")
        return bound.reshape(B, Hq, -1)

    def select(self, state, q, k_cache, length):
        B, Hq, _ = q.shape
        n_pages = state["bounds"].shape[3]
        length = jnp.asarray(length, jnp.int32)
        last = (length - 1) // self.page  # the current page, always read
        r = length - last * self.page  # its tokens, 1..page
        k = min(self.budget // self.page, n_pages)

        def choose():  # the top complete pages by bound, best first; those past the first `last` are filler
            bound = self.page_bounds(state, q)
            complete = jnp.arange(n_pages)[None, None, :] < last
            top = jax.lax.top_k(jnp.where(complete, bound, -jnp.inf), k)[1].astype(jnp.int32)  # [B, Hq, k]
            return top, jnp.minimum(last, k)

        if self.every == 1:
            top, n_chosen = choose()
        else:
            top, n_chosen = jax.lax.cond(state["steps"] % self.every == 0, choose,
                                         lambda: (state["top"], state["n_chosen"]))
            state = {**state, "top": top, "n_chosen": n_chosen, "steps": state["steps"] + 1}
        m = jnp.minimum(n_chosen, (self.budget - r) // self.page)  # whole pages that fit beside the current one
        # Every complete page fits: read them all (a reused choice may lack the pages completed since).
        fits = last <= (self.budget - r) // self.page
        top = jnp.where(fits, jnp.arange(k, dtype=jnp.int32), top)
        m = jnp.where(fits, last, m)
        idx = jnp.concatenate([jnp.broadcast_to(last, (B, Hq, 1)), top], axis=-1)
        cnt = jnp.broadcast_to(1 + m, (B, Hq)).astype(jnp.int32)
        return [Selection(idx, cnt, "block", self.page)], state
