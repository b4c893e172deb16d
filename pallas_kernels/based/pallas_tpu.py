"""BASED Taylor linear attention on TPU: Mosaic `pl.pallas_call` kernels, forward and two-pass backward.

Paper: arXiv 2402.18668 §3.1. Grid structure as Lightning's pallas_tpu.py (after apple/axlearn's rattention kernel).

Tiling (README.md, "Kernels"): grid (B, H, N) with dimension semantics ("parallel", "parallel", "arbitrary"). The
chunk axis runs in order on one core, so the state Σ φ(k) vᵀ [P, V] and Σ φ(k) [1, P] (float32, symmetric features,
P = 256 at F = 16; chunk_math.py) lives in VMEM scratch across grid steps, zeroed at chunk 0. One [C, X] chunk of
q, k, v per step comes in through BlockSpecs from a head-major [B, H, T, X] copy, so the last two block dims are
(C, X) with X the full dim (any F and V tile) and C a multiple of 16: the kernels round the caller's chunk_size up
to one (`chunk`), which changes only the order of float32 sums. T is zero-padded to a multiple of C and the padding
kept out of the state. The feature map's constant selection matrices are whole-array blocks with a constant
index, so they are copied into VMEM once.

Backward (README.md): the forward saves only q, k, v (api.py). Pass 1 (chunks in order, state recomputed in scratch)
writes dQ and the rows 1/(den + eps) and d_den; pass 2 (reverse index maps, the state's cotangents in scratch)
recomputes φ(k), φ(q) and the weights and writes dK and dV. No feature map is stored.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from effarch.pallas_kernels.based import chunk_math, cost
from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.mosaic_utils import chunk, chunk_spec, compiler_params, head_major, time_major
from effarch.pallas_kernels.vma import out_struct


def _weight_specs(f, p):
    return [pl.BlockSpec(shape, lambda b, h, i: (0, 0)) for shape in ((f, p), (1, p), (f, p), (1, p))]


def _weights(f):
    return tuple(jnp.asarray(w) for w in chunk_math.feature_weights(f))


def _state_scratch(p, v_dim):
    return [pltpu.VMEM((p, v_dim), jnp.float32), pltpu.VMEM((1, p), jnp.float32)]


def _zero_at_first_step(*refs):
    @pl.when(pl.program_id(2) == 0)
    def _():
        for ref in refs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)


def _valid(c, chunk, t_len):
    return chunk_math.valid_rows(c, t_len - chunk * c)


def based_fwd_kernel(q_ref, k_ref, v_ref, a_ref, a0_ref, b_ref, b0_ref, o_ref, kv_ref, k_sum_ref,
                     *, t_len, c, scale, eps):
    _zero_at_first_step(kv_ref, k_sum_ref)
    weights = (a_ref[...], a0_ref[...], b_ref[...], b0_ref[...])
    o, kv, k_sum = chunk_math.forward(
        q_ref[...], k_ref[...], v_ref[...], kv_ref[...], k_sum_ref[...], weights, _valid(c, pl.program_id(2), t_len),
        c=c, scale=scale, eps=eps,
    )
    o_ref[...] = o.astype(o_ref.dtype)
    kv_ref[...] = kv
    k_sum_ref[...] = k_sum


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
    c = chunk(chunk_size)
    n = pl.cdiv(t, c)
    p = chunk_math.padded_features(f)
    o = pl.pallas_call(
        functools.partial(based_fwd_kernel, t_len=t, c=c, scale=f**-0.5, eps=eps),
        grid=(b, h, n),
        in_specs=[chunk_spec(c, f), chunk_spec(c, f), chunk_spec(c, v_dim), *_weight_specs(f, p)],
        out_specs=chunk_spec(c, v_dim),
        out_shape=out_struct((b, h, n * c, v_dim), v.dtype, q),
        scratch_shapes=_state_scratch(p, v_dim),
        compiler_params=compiler_params(),
        cost_estimate=cost.forward(b, h, n, c, f, p, v_dim, q.dtype.itemsize, weight_loads=1),
        interpret=interpret,
        name="based_fwd",
    )(*(head_major(x, n * c) for x in (q, k, v)), *_weights(f))
    return time_major(o, t)


def based_bwd_dq_kernel(q_ref, k_ref, v_ref, do_ref, a_ref, a0_ref, b_ref, b0_ref, dq_ref, inv_den_ref, d_den_ref,
                        kv_ref, k_sum_ref, *, t_len, c, scale, eps):
    _zero_at_first_step(kv_ref, k_sum_ref)
    weights = (a_ref[...], a0_ref[...], b_ref[...], b0_ref[...])
    dq, inv_den, d_den, kv, k_sum = chunk_math.backward_dq(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], kv_ref[...], k_sum_ref[...], weights,
        _valid(c, pl.program_id(2), t_len), c=c, scale=scale, eps=eps,
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    inv_den_ref[...] = inv_den
    d_den_ref[...] = d_den
    kv_ref[...] = kv
    k_sum_ref[...] = k_sum


def based_bwd_dkv_kernel(q_ref, k_ref, v_ref, do_ref, inv_den_ref, d_den_ref, a_ref, a0_ref, b_ref, b0_ref,
                         dk_ref, dv_ref, d_kv_ref, d_k_sum_ref, *, t_len, c, scale):
    _zero_at_first_step(d_kv_ref, d_k_sum_ref)
    weights = (a_ref[...], a0_ref[...], b_ref[...], b0_ref[...])
    chunk = pl.num_programs(2) - 1 - pl.program_id(2)
    dk, dv, d_kv, d_k_sum = chunk_math.backward_dkv(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], inv_den_ref[...], d_den_ref[...], d_kv_ref[...],
        d_k_sum_ref[...], weights, _valid(c, chunk, t_len), c=c, scale=scale,
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    d_kv_ref[...] = d_kv
    d_k_sum_ref[...] = d_k_sum


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
    c = chunk(chunk_size)
    n = pl.cdiv(t, c)
    p = chunk_math.padded_features(f)
    qh, kh, vh, doh = (head_major(x, n * c) for x in (q, k, v, d_out))
    weights = _weights(f)
    row = out_struct((b, h, n * c, 1), jnp.float32, q)
    dq, inv_den, d_den = pl.pallas_call(
        functools.partial(based_bwd_dq_kernel, t_len=t, c=c, scale=f**-0.5, eps=eps),
        grid=(b, h, n),
        in_specs=[chunk_spec(c, f), chunk_spec(c, f), chunk_spec(c, v_dim), chunk_spec(c, v_dim),
                  *_weight_specs(f, p)],
        out_specs=[chunk_spec(c, f), chunk_spec(c, 1), chunk_spec(c, 1)],
        out_shape=[out_struct((b, h, n * c, f), q.dtype, q), row, row],
        scratch_shapes=_state_scratch(p, v_dim),
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dq(b, h, n, c, f, p, v_dim, q.dtype.itemsize, weight_loads=1),
        interpret=interpret,
        name="based_bwd_dq",
    )(qh, kh, vh, doh, *weights)
    dk, dv = pl.pallas_call(
        functools.partial(based_bwd_dkv_kernel, t_len=t, c=c, scale=f**-0.5),
        grid=(b, h, n),
        in_specs=[chunk_spec(c, w, n) for w in (f, f, v_dim, v_dim, 1, 1)] + _weight_specs(f, p),
        out_specs=[chunk_spec(c, f, n), chunk_spec(c, v_dim, n)],
        out_shape=[
            out_struct((b, h, n * c, f), k.dtype, q),
            out_struct((b, h, n * c, v_dim), v.dtype, q),
        ],
        scratch_shapes=_state_scratch(p, v_dim),
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dkv(b, h, n, c, f, p, v_dim, q.dtype.itemsize, weight_loads=1),
        interpret=interpret,
        name="based_bwd_dkv",
    )(qh, kh, vh, doh, inv_den, d_den, *weights)
    return time_major(dq, t), time_major(dk, t), time_major(dv, t)
