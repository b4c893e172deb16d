"""BASED Taylor linear attention on GPU: `pl.pallas_call` kernels (Triton lowering), forward and two-pass backward.

Paper: arXiv 2402.18668 §3.1. Reference: fla-org/flash-linear-attention@bc3b101, fla/ops/based (fused_chunk.py walks
the chunks of one (batch, head) inside one program, as here).

Tiling (README.md, "Kernels"): grid (B, H), one program per (batch, head). The program walks the N = ⌈T/C⌉ chunks
in a `lax.fori_loop`, carrying the state Σ φ(k) vᵀ [P, V] and Σ φ(k) [1, P] (float32, symmetric features, P = 256 at
F = 16; chunk_math.py) in registers; never across programs, which run in parallel and in no order. q, k, v stay in
their [B, T, H, X] layout; each step loads one [C, X] slice. Triton's power-of-2 values and `tl.dot`'s minimum
side make the kernels run C, F and V rounded up to powers of 2 ≥ 16 (`tile`): F and V are zero-padded (the feature
selection matrices get zero rows for padded features and the scale stays 1/√F of the real F, so φ is unchanged;
padded value columns are sliced off), T is zero-padded to a multiple of C and the padding kept out of the state.

Backward (README.md): the forward saves only q, k, v (api.py). Pass 1 walks chunks in time order, recomputes the
state and φ(q) and writes dQ plus two per-token rows, 1/(den + eps) and d_den; pass 2 walks them in reverse carrying
the state's cotangents, recomputes φ(k), φ(q) and the [C, C] weights, and writes dK and dV. No feature map is stored.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from effarch.pallas_kernels.based import chunk_math, cost
from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.triton_utils import compiler_params, pad, tile, time_spec
from effarch.pallas_kernels.vma import out_struct


def _weight_specs(f, p):
    return [pl.BlockSpec(shape, lambda b, h: (0, 0)) for shape in ((f, p), (1, p), (f, p), (1, p))]


def _weights(f, f_pad):
    """The selection matrices of the real F, with zero rows for the padded features."""
    a, a0, b, b0 = chunk_math.feature_weights(f)
    rows = ((0, f_pad - f), (0, 0))
    return jnp.asarray(np.pad(a, rows)), jnp.asarray(a0), jnp.asarray(np.pad(b, rows)), jnp.asarray(b0)


def _load_weights(refs):
    return tuple(ref[...] for ref in refs)


def based_fwd_kernel(q_ref, k_ref, v_ref, a_ref, a0_ref, b_ref, b0_ref, o_ref, *, t_len, c, scale, eps):
    weights = _load_weights((a_ref, a0_ref, b_ref, b0_ref))
    p = a_ref.shape[1]

    def body(i, carry):
        kv, k_sum = carry
        rows = pl.ds(i * c, c)
        valid = chunk_math.valid_rows(c, t_len - i * c)
        o, kv, k_sum = chunk_math.forward(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], kv, k_sum, weights, valid, c=c, scale=scale, eps=eps
        )
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return kv, k_sum

    init = (jnp.zeros((p, v_ref.shape[-1]), jnp.float32), jnp.zeros((1, p), jnp.float32))
    jax.lax.fori_loop(0, pl.cdiv(t_len, c), body, init)


@functools.partial(jax.jit, static_argnames=("chunk_size", "eps", "interpret"))
def based_fwd(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    *,
    chunk_size: int,
    eps: float,
    interpret: Interpret,
) -> Float[Array, "B T H V"]:
    """o [B, T, H, V] in v's dtype."""
    b, t, h, f = q.shape
    v_dim = v.shape[-1]
    c, fp, vp = tile(chunk_size), tile(f), tile(v_dim)
    t_pad = pl.cdiv(t, c) * c
    p = chunk_math.padded_features(f)
    o = pl.pallas_call(
        functools.partial(based_fwd_kernel, t_len=t, c=c, scale=f**-0.5, eps=eps),
        grid=(b, h),
        in_specs=[time_spec(t_pad, fp), time_spec(t_pad, fp), time_spec(t_pad, vp), *_weight_specs(fp, p)],
        out_specs=time_spec(t_pad, vp),
        out_shape=out_struct((b, t_pad, h, vp), v.dtype, q),
        compiler_params=compiler_params(),
        cost_estimate=cost.forward(b, h, t_pad // c, c, fp, p, vp, q.dtype.itemsize, weight_loads=b * h),
        interpret=interpret,
        name="based_fwd",
    )(pad(q, t_pad, fp), pad(k, t_pad, fp), pad(v, t_pad, vp), *_weights(f, fp))
    return o[:, :t, :, :v_dim]


def based_bwd_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, a_ref, a0_ref, b_ref, b0_ref, dq_ref, inv_den_ref, d_den_ref, *, t_len, c, scale, eps
):
    weights = _load_weights((a_ref, a0_ref, b_ref, b0_ref))
    p = a_ref.shape[1]

    def body(i, carry):
        kv, k_sum = carry
        rows = pl.ds(i * c, c)
        valid = chunk_math.valid_rows(c, t_len - i * c)
        dq, inv_den, d_den, kv, k_sum = chunk_math.backward_dq(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], kv, k_sum, weights, valid,
            c=c, scale=scale, eps=eps,
        )
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        inv_den_ref[rows, :] = inv_den
        d_den_ref[rows, :] = d_den
        return kv, k_sum

    init = (jnp.zeros((p, v_ref.shape[-1]), jnp.float32), jnp.zeros((1, p), jnp.float32))
    jax.lax.fori_loop(0, pl.cdiv(t_len, c), body, init)


def based_bwd_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, inv_den_ref, d_den_ref, a_ref, a0_ref, b_ref, b0_ref, dk_ref, dv_ref,
    *, t_len, c, scale,
):
    weights = _load_weights((a_ref, a0_ref, b_ref, b0_ref))
    p = a_ref.shape[1]
    n = pl.cdiv(t_len, c)

    def body(step, carry):
        d_kv, d_k_sum = carry
        i = n - 1 - step
        rows = pl.ds(i * c, c)
        valid = chunk_math.valid_rows(c, t_len - i * c)
        dk, dv, d_kv, d_k_sum = chunk_math.backward_dkv(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], inv_den_ref[rows, :],
            d_den_ref[rows, :], d_kv, d_k_sum, weights, valid, c=c, scale=scale,
        )
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return d_kv, d_k_sum

    init = (jnp.zeros((p, v_ref.shape[-1]), jnp.float32), jnp.zeros((1, p), jnp.float32))
    jax.lax.fori_loop(0, n, body, init)


@functools.partial(jax.jit, static_argnames=("chunk_size", "eps", "interpret"))
def based_bwd(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    d_out: Float[Array, "B T H V"],
    *,
    chunk_size: int,
    eps: float,
    interpret: Interpret,
) -> tuple[Float[Array, "B T H F"], Float[Array, "B T H F"], Float[Array, "B T H V"]]:
    """(dq, dk, dv) in the inputs' dtypes, two kernels."""
    b, t, h, f = q.shape
    v_dim = v.shape[-1]
    c, f_pad, v_pad = tile(chunk_size), tile(f), tile(v_dim)
    t_pad = pl.cdiv(t, c) * c
    p = chunk_math.padded_features(f)
    qp, kp = pad(q, t_pad, f_pad), pad(k, t_pad, f_pad)
    vp, dop = pad(v, t_pad, v_pad), pad(d_out, t_pad, v_pad)
    weights = _weights(f, f_pad)
    row = out_struct((b, t_pad, h, 1), jnp.float32, q)
    dq, inv_den, d_den = pl.pallas_call(
        functools.partial(based_bwd_dq_kernel, t_len=t, c=c, scale=f**-0.5, eps=eps),
        grid=(b, h),
        in_specs=[time_spec(t_pad, f_pad), time_spec(t_pad, f_pad), time_spec(t_pad, v_pad),
                  time_spec(t_pad, v_pad), *_weight_specs(f_pad, p)],
        out_specs=[time_spec(t_pad, f_pad), time_spec(t_pad, 1), time_spec(t_pad, 1)],
        out_shape=[out_struct((b, t_pad, h, f_pad), q.dtype, q), row, row],
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dq(b, h, t_pad // c, c, f_pad, p, v_pad, q.dtype.itemsize, weight_loads=b * h),
        interpret=interpret,
        name="based_bwd_dq",
    )(qp, kp, vp, dop, *weights)
    dk, dv = pl.pallas_call(
        functools.partial(based_bwd_dkv_kernel, t_len=t, c=c, scale=f**-0.5),
        grid=(b, h),
        in_specs=[time_spec(t_pad, f_pad), time_spec(t_pad, f_pad), time_spec(t_pad, v_pad),
                  time_spec(t_pad, v_pad), time_spec(t_pad, 1), time_spec(t_pad, 1), *_weight_specs(f_pad, p)],
        out_specs=[time_spec(t_pad, f_pad), time_spec(t_pad, v_pad)],
        out_shape=[
            out_struct((b, t_pad, h, f_pad), k.dtype, q),
            out_struct((b, t_pad, h, v_pad), v.dtype, q),
        ],
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dkv(b, h, t_pad // c, c, f_pad, p, v_pad, q.dtype.itemsize, weight_loads=b * h),
        interpret=interpret,
        name="based_bwd_dkv",
    )(qp, kp, vp, dop, inv_den, d_den, *weights)
    return dq[:, :t, :, :f], dk[:, :t, :, :f], dv[:, :t, :, :v_dim]
