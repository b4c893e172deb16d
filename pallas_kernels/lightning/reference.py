"""Readable oracles for Lightning attention: the quadratic masked form and the token-by-token recurrence.

Paper: Lightning Attention-2, arXiv 2401.04658 (eq. for O = [(Q Kᵀ) ⊙ M] V); TransNormerLLM, arXiv 2307.14995.
Reference: OpenNLPLab/lightning-attention@d15c385, lightning_attn/ops/torch/linear_attention.py::linear_attn
(the quadratic form; it builds the same T×T decay mask).

Both functions compute, per head h with rate s_h ≥ 0 (λ_h = exp(−s_h)) and an optional initial state kv_{−1},

    kv_t = λ kv_{t−1} + k_tᵀ v_t,        o_t = q_t kv_t
         = Σ_{j≤t} λ^{t−j} (q_t · k_j) v_j + λ^{t+1} q_t kv_{−1}.

No 1/√K scale, no normaliser. Everything accumulates in float32; the decay powers are computed as exp(−s·n) with
n ≥ 0, so a large s underflows to 0 instead of overflowing.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def decay_mask(decay: Float[Array, " H"], t_len: int, s_len: int, offset: int = 0) -> Float[Array, "H T S"]:
    """M[h, t, j] = exp(−s_h (t + offset − j)) where t + offset ≥ j, else 0."""
    distance = jnp.arange(t_len)[:, None] + offset - jnp.arange(s_len)[None, :]
    # Clamp before exp so the masked (negative-distance) entries never overflow to inf (inf * 0 = nan).
    powers = jnp.exp(-decay.astype(jnp.float32)[:, None, None] * jnp.maximum(distance, 0)[None, :, :])
    return jnp.where((distance >= 0)[None, :, :], powers, 0.0)


def lightning_quadratic(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"] | None = None,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """O = [(Q Kᵀ) ⊙ M] V with M_tj = λ^{t−j} (t ≥ j): O(T²) memory, the oracle.

    Args:
      q: queries, [B, T, H, K].
      k: keys, [B, T, H, K].
      v: values, [B, T, H, V].
      decay: per-head rate s_h ≥ 0, [H].
      initial_state: state before the first token, [B, H, K, V]; zeros if None.

    Returns:
      (o [B, T, H, V] in v's dtype, final state kv_{T−1} [B, H, K, V] in float32).
    """
    t_len = q.shape[1]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    scores = jnp.einsum("BTHK,BSHK->BHTS", qf, kf) * decay_mask(decay, t_len, t_len)[None]
    o = jnp.einsum("BHTS,BSHV->BTHV", scores, vf)
    # kv_{T−1} = λ^T kv_{−1} + Σ_j λ^{T−1−j} k_jᵀ v_j: row T−1 of the mask, read as key weights.
    key_weight = decay_mask(decay, 1, t_len, offset=t_len - 1)[:, 0, :]
    state = jnp.einsum("BSHK,HS,BSHV->BHKV", kf, key_weight, vf)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        # λ^{t+1} for the query at position t, [T, H].
        query_weight = jnp.transpose(decay_mask(decay, t_len, 1, offset=1)[:, :, 0])
        o = o + jnp.einsum("BTHK,BHKV->BTHV", qf, s0) * query_weight[None, :, :, None]
        block_decay = jnp.exp(-decay.astype(jnp.float32) * t_len)
        state = state + block_decay[None, :, None, None] * s0
    return o.astype(v.dtype), state


def lightning_step(
    state: Float[Array, "B H K V"],
    q_t: Float[Array, "B H K"],
    k_t: Float[Array, "B H K"],
    v_t: Float[Array, "B H V"],
    decay: Float[Array, " H"],
) -> tuple[Float[Array, "B H K V"], Float[Array, "B H V"]]:
    """One recurrent step: kv ← λ kv + k_tᵀ v_t, then o_t = q_t kv. The state stays float32."""
    lam = jnp.exp(-decay.astype(jnp.float32))
    outer = jnp.einsum("BHK,BHV->BHKV", k_t.astype(jnp.float32), v_t.astype(jnp.float32))
    state = lam[None, :, None, None] * state.astype(jnp.float32) + outer
    o_t = jnp.einsum("BHK,BHKV->BHV", q_t.astype(jnp.float32), state)
    return state, o_t.astype(v_t.dtype)


def lightning_scan(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"] | None = None,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """Token-by-token recurrence (`lightning_step` under lax.scan): the definition the quadratic form must match.

    Args and returns as `lightning_quadratic`.
    """
    batch, _, heads, k_dim = q.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, k_dim, v.shape[-1]), jnp.float32)

    def step(state, qkv_t):
        return lightning_step(state, *qkv_t, decay)

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    state, o = jax.lax.scan(step, initial_state.astype(jnp.float32), time_major)
    return jnp.moveaxis(o, 0, 1), state
