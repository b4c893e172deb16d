"""Per-chunk maths of the BASED Pallas kernels on blocks already loaded from refs (shared by pallas_gpu.py and
pallas_tpu.py), with the symmetric degree-2 feature map that keeps their on-chip state small.

Paper: arXiv 2402.18668 §3.1. Derivation (forward and backward) in README.md, "Kernels".

Symmetric features. φ(x)·φ(y) = 1 + s + s²/2 (s = x·y/√F) needs only the F(F+1)/2 products x_i x_j with i ≤ j, the
off-diagonal ones weighted by √2: P' = 1 + F + F(F+1)/2 = 153 features at F = 16 instead of 1 + F + F² = 273
(fla's `TaylorFeatureMap` layout). The kernels keep Σ φ(k) vᵀ [P, V] and Σ φ(k) [1, P] in registers / VMEM, with P
the next power of 2 ≥ P' (Triton's rule; 256 at F = 16, against 512 for the full map), the extra columns zero.

Each feature is a product of two affine functions of x, φ_p(x) = (x·a_p + a0_p)(x·b_p + b0_p), with at most one
non-zero in a_p and in b_p: the constant 1 (a0 = b0 = 1), the linear x_i/F^¼ (b0 = 1) and the quadratic
c_ij x_i x_j. So φ(X) for a [C, F] block is two small matmuls with constant selection matrices and one elementwise
product, which lowers on Mosaic and Triton alike (no gathers, reshapes or rank-3 values in the kernel), and its
backward is two more: dX = (dΦ ⊙ XB) Aᵀ + (dΦ ⊙ XA) Bᵀ. The selection matmuls run at HIGHEST precision, so on the
device they are exact copies (times c) of x, not TF32/bf16 roundings.

Rows past the chunk's L valid tokens are zero padding: their keys are kept out of the state with `valid` (φ(0) is
e_0, not 0); their query rows produce garbage that the caller slices off, and their zero cotangents add nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from effarch.pallas_kernels.based import reference

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def n_features(feature_dim: int) -> int:
    """P' = 1 + F + F(F+1)/2, the symmetric map's length (153 at F = 16): reference.taylor_feature_map's, in its
    order, so a kernel's state columns are the recurrent step's."""
    return reference.feature_dim_expanded(feature_dim)


def padded_features(feature_dim: int) -> int:
    """P, the kernels' state width: the next power of 2 ≥ P'."""
    return 1 << (n_features(feature_dim) - 1).bit_length()


def feature_weights(feature_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A [F, P], a0 [1, P], Bm [F, P], b0 [1, P]) float32 with φ(X) = (X A + a0) ⊙ (X Bm + b0), static numpy."""
    f = feature_dim
    p = padded_features(f)
    a, a0 = np.zeros((f, p), np.float32), np.zeros((1, p), np.float32)
    b, b0 = np.zeros((f, p), np.float32), np.zeros((1, p), np.float32)
    a0[0, 0] = b0[0, 0] = 1.0  # the constant feature
    for i in range(f):  # linear: x_i / F^(1/4)
        a[i, 1 + i] = f**-0.25
        b0[0, 1 + i] = 1.0
    col = 1 + f
    for i in range(f):  # quadratic, i <= j: x_i x_j / (√2 √F), off-diagonal times √2
        for j in range(i, f):
            a[i, col] = (1.0 if i == j else math.sqrt(2.0)) / (math.sqrt(2.0) * math.sqrt(f))
            b[j, col] = 1.0
            col += 1
    assert col == n_features(f)
    return a, a0, b, b0


def _dot(x, y, precision=None):
    return jnp.dot(x, y, preferred_element_type=F32, precision=precision)


def features(x, a, a0, b, b0):
    """(φ(x) [C, P], x A + a0, x Bm + b0), float32."""
    xf = x.astype(F32)
    xa = _dot(xf, a, HIGHEST) + a0
    xb = _dot(xf, b, HIGHEST) + b0
    return xa * xb, xa, xb


def features_vjp(d_phi, xa, xb, a, b):
    """Cotangent of x [C, F] from that of φ(x) [C, P]."""
    return _dot(d_phi * xb, a.T, HIGHEST) + _dot(d_phi * xa, b.T, HIGHEST)


def causal_scores(q, k, c: int, scale: float):
    """(s [C, C] = q kᵀ/√F, causal mask [C, C]) in float32; bf16 q and k multiply exactly."""
    s = _dot(q, k.T) * scale
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return s, i >= j


def valid_rows(c: int, length):
    """[C, 1] float32: 1 for the chunk's `length` real tokens, 0 for the padding."""
    return (jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) < length).astype(F32)


def _read(q, k, v, kv, k_sum, weights, c, scale, eps):
    """Numerator, 1/(denominator + eps), and what the backward reuses, for one chunk's queries."""
    s, causal = causal_scores(q, k, c, scale)
    w = jnp.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
    phi_q, qa, qb = features(q, *weights)
    num = _dot(w, v.astype(F32)) + _dot(phi_q, kv)
    den = jnp.sum(w, axis=1, keepdims=True) + jnp.sum(phi_q * k_sum, axis=1, keepdims=True)
    return num, 1.0 / (den + eps), s, causal, w, phi_q, qa, qb


def _write(k, v, kv, k_sum, weights, valid):
    """The state after the chunk: kv + φ(k)ᵀ v, k_sum + Σ φ(k), padding rows excluded."""
    phi_k = features(k, *weights)[0] * valid
    return kv + _dot(phi_k.T, v.astype(F32)), k_sum + jnp.sum(phi_k, axis=0, keepdims=True)


def forward(q, k, v, kv, k_sum, weights, valid, *, c: int, scale: float, eps: float):
    """One chunk: (o [C, V] float32, kv [P, V], k_sum [1, P] after the chunk)."""
    num, inv_den = _read(q, k, v, kv, k_sum, weights, c, scale, eps)[:2]
    return num * inv_den, *_write(k, v, kv, k_sum, weights, valid)


def backward_dq(q, k, v, do, kv, k_sum, weights, valid, *, c: int, scale: float, eps: float):
    """Pass 1 (time order, state recomputed): (dq [C, F], 1/(den + eps) [C, 1], d_den [C, 1], kv, k_sum).

    With r = 1/(den + eps) and o = num r: d_num = dO r and d_den = −Σ_v (dO ⊙ o) r; pass 2 reuses both rows.
    """
    num, inv_den, s, causal, _, _, qa, qb = _read(q, k, v, kv, k_sum, weights, c, scale, eps)
    do = do.astype(F32)
    d_num = do * inv_den
    d_den = -jnp.sum(do * num, axis=1, keepdims=True) * inv_den * inv_den
    d_w = jnp.where(causal, _dot(d_num, v.astype(F32).T) + d_den, 0.0)
    d_s = d_w * (1.0 + s)
    dq = _dot(d_s, k.astype(F32)) * scale
    d_phi = _dot(d_num, kv.T) + d_den * k_sum
    dq = dq + features_vjp(d_phi, qa, qb, weights[0], weights[2])
    return dq, inv_den, d_den, *_write(k, v, kv, k_sum, weights, valid)


def backward_dkv(q, k, v, do, inv_den, d_den, d_kv, d_k_sum, weights, valid, *, c: int, scale: float):
    """Pass 2 (reverse order; d_kv, d_k_sum are the cotangents of the state after this chunk).

    Returns (dk [C, F], dv [C, V], d_kv, d_k_sum before the chunk).
    """
    s, causal = causal_scores(q, k, c, scale)
    w = jnp.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
    d_num = do.astype(F32) * inv_den
    d_w = jnp.where(causal, _dot(d_num, v.astype(F32).T) + d_den, 0.0)
    d_s = d_w * (1.0 + s)
    dk = _dot(d_s.T, q.astype(F32)) * scale
    phi_k, ka, kb = features(k, *weights)
    phi_k = phi_k * valid
    dv = _dot(w.T, d_num) + _dot(phi_k, d_kv)
    d_phi_k = (_dot(v.astype(F32), d_kv.T) + d_k_sum) * valid
    dk = dk + features_vjp(d_phi_k, ka, kb, weights[0], weights[2])
    phi_q = features(q, *weights)[0]
    d_kv = d_kv + _dot(phi_q.T, d_num)
    d_k_sum = d_k_sum + jnp.sum(phi_q * d_den, axis=0, keepdims=True)
    return dk, dv, d_kv, d_k_sum
