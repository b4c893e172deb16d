"""Per-chunk maths of the Lightning Pallas kernels, on blocks already loaded from refs (shared by pallas_gpu.py and
pallas_tpu.py, which differ only in how chunks are walked and where the state lives).

Paper: Lightning Attention-2, arXiv 2401.04658, Alg. 5 (forward) and Alg. 6 (backward); the derivation and index
conventions are in README.md. For a chunk of C rows of which the first L hold tokens (L < C only for the last chunk;
the rows past L are zero padding), with S the state before the chunk:

    O   = [(Q Kᵀ) ⊙ M] V + (Q S) ⊙ qd          M_ij = λ^{i−j} (i ≥ j), qd_i = λ^{i+1}
    S  ← λ^L S + (K ⊙ kd)ᵀ V                   kd_j = λ^{L−1−j} (clamped at λ⁰ for the zero rows j ≥ L)

Everything here must lower for both Mosaic TPU and Triton:
- integer iotas cast to float (Mosaic has no float iota), 2-D everywhere (a per-row factor is [C, 1], a scalar
  factor [1, 1]) so no rank-1 vector or scalar transcendental is needed;
- matmuls take the inputs in their own dtype (bf16 × bf16 is exact in float32) with float32 accumulation; products
  with a float32 intermediate (scores, state) are float32, so a bf16 kernel rounds only its inputs and output, as
  the reference does.
- decay powers are exp(−s·n) with n ≥ 0 (no Λ⁻¹): a large rate underflows to 0 instead of overflowing.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32)


def intra_decays(rate, c: int):
    """(M [C, C], qd [C, 1]) for a per-head rate s (a float32 scalar): the same for every chunk."""
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    distance = i - j
    mask = jnp.where(distance >= 0, jnp.exp(-rate * jnp.maximum(distance, 0).astype(F32)), 0.0)
    row = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    query = jnp.exp(-rate * (row + 1).astype(F32))
    return mask, query


def inter_decays(rate, c: int, length):
    """(kd [C, 1], λ^L [1, 1]) for a chunk with `length` valid rows (an int32 scalar, possibly traced)."""
    row = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    key = jnp.exp(-rate * jnp.maximum(length - 1 - row, 0).astype(F32))
    block = jnp.exp(-rate * jnp.full((1, 1), length, jnp.int32).astype(F32))
    return key, block


def forward(q, k, v, state, mask, query, key, block):
    """Alg. 5 on one chunk: (o [C, V] float32, state after the chunk [K, V] float32)."""
    scores = _dot(q, k.T) * mask
    o = _dot(scores, v.astype(F32)) + _dot(q.astype(F32), state) * query
    state = state * block + _dot((k.astype(F32) * key).T, v.astype(F32))
    return o, state


def backward_dq(k, v, do, state, mask, query, key, block):
    """Alg. 6 pass 1 (chunks in time order, S recomputed): (dq [C, K] float32, state after the chunk)."""
    d_scores = _dot(do, v.T) * mask
    dq = _dot(d_scores, k.astype(F32)) + _dot(do.astype(F32), state.T) * query
    state = state * block + _dot((k.astype(F32) * key).T, v.astype(F32))
    return dq, state


def backward_dkv(q, k, v, do, d_state, mask, query, key, block):
    """Alg. 6 pass 2 (chunks in reverse; dS is the cotangent of the state after this chunk).

    Returns (dk [C, K], dv [C, V], dS before the chunk [K, V]), all float32.
    """
    scores = _dot(q, k.T) * mask
    d_scores = _dot(do, v.T) * mask
    k_decayed = k.astype(F32) * key
    dk = _dot(d_scores.T, q.astype(F32)) + _dot(v.astype(F32), d_state.T) * key
    dv = _dot(scores.T, do.astype(F32)) + _dot(k_decayed, d_state)
    d_state = d_state * block + _dot((q.astype(F32) * query).T, do.astype(F32))
    return dk, dv, d_state
