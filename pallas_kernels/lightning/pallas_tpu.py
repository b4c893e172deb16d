"""Lightning attention on TPU: Mosaic `pl.pallas_call` kernels, forward and Alg. 6's two-pass backward.

Paper: Lightning Attention-2, arXiv 2401.04658, Alg. 5 / Alg. 6. Grid structure after apple/axlearn's
rattention linear-attention kernel (a sequential chunk axis carrying the state).

Tiling (README.md, "Kernels"): grid (B, H, N) with dimension semantics ("parallel", "parallel", "arbitrary"). The
chunk axis runs in order on one core, so the running [K, V] float32 state lives in a VMEM scratch buffer across grid
steps: it is set from the initial state at chunk 0 and written out at chunk N−1. BlockSpecs bring one [C, X] chunk
of q, k, v into VMEM per step (Pallas double-buffers the HBM→VMEM copies). The per-head rates sit in SMEM.

Mosaic's block rule is that the last two block dims are multiples of (8, 128) or the full array dims. Chunks are
therefore taken from a head-major [B, H, T, X] copy, whose last two block dims are (C, X): X is the full dim, so any
head dim tiles, and C must be a multiple of 16 (8 sublanes, 16 for packed bf16): the kernels round the caller's
block_size up to one (`chunk`), which changes only the order of float32 sums. T is zero-padded to a multiple of C;
the last chunk's L < C tokens get their own decays in the kernel (chunk_math.py), so the padding is exact.

Backward: pass 1 walks chunks forward recomputing S in scratch and writes dQ; pass 2 walks them in reverse (the
index maps read chunk N−1−i at step i) carrying dS in scratch and writes dK, dV and the initial state's cotangent.
The decay rates get no cotangent (a fixed schedule; api.py returns zeros).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.lightning import chunk_math, cost
from effarch.pallas_kernels.mosaic_utils import chunk, chunk_spec, compiler_params, head_major, time_major
from effarch.pallas_kernels.vma import out_struct


def _state_spec(k_dim, v_dim):
    return pl.BlockSpec((None, None, k_dim, v_dim), lambda b, h, i: (b, h, 0, 0))


_DECAY_SPEC = pl.BlockSpec(memory_space=pltpu.SMEM)


def _decays(decay_ref, chunk, c, t_len):
    rate = decay_ref[pl.program_id(1)]
    length = jnp.minimum(c, t_len - chunk * c)
    return chunk_math.intra_decays(rate, c) + chunk_math.inter_decays(rate, c, length)


def lightning_fwd_kernel(decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, s_out_ref, state_ref, *, t_len: int, c: int):
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        state_ref[...] = s0_ref[...].astype(jnp.float32)

    o, state = chunk_math.forward(
        q_ref[...], k_ref[...], v_ref[...], state_ref[...], *_decays(decay_ref, i, c, t_len)
    )
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = state

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = state.astype(s_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def lightning_fwd(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"],
    *,
    block_size: int,
    interpret: Interpret,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """Alg. 5: (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32)."""
    b, t, h, k_dim = q.shape
    v_dim = v.shape[-1]
    c = chunk(block_size)
    n = pl.cdiv(t, c)
    o, state = pl.pallas_call(
        functools.partial(lightning_fwd_kernel, t_len=t, c=c),
        grid=(b, h, n),
        in_specs=[_DECAY_SPEC, chunk_spec(c, k_dim), chunk_spec(c, k_dim), chunk_spec(c, v_dim),
                  _state_spec(k_dim, v_dim)],
        out_specs=[chunk_spec(c, v_dim), _state_spec(k_dim, v_dim)],
        out_shape=[
            out_struct((b, h, n * c, v_dim), v.dtype, q),
            out_struct((b, h, k_dim, v_dim), jnp.float32, q),
        ],
        scratch_shapes=[pltpu.VMEM((k_dim, v_dim), jnp.float32)],
        compiler_params=compiler_params(),
        cost_estimate=cost.forward(b, h, n, c, k_dim, v_dim, q.dtype.itemsize, mask_per_chunk=True),
        interpret=interpret,
        name="lightning_fwd",
    )(decay.astype(jnp.float32), *(head_major(x, n * c) for x in (q, k, v)), initial_state.astype(jnp.float32))
    return time_major(o, t), state


def lightning_bwd_dq_kernel(decay_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, state_ref, *, t_len: int, c: int):
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        state_ref[...] = s0_ref[...].astype(jnp.float32)

    dq, state = chunk_math.backward_dq(
        k_ref[...], v_ref[...], do_ref[...], state_ref[...], *_decays(decay_ref, i, c, t_len)
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    state_ref[...] = state


def lightning_bwd_dkv_kernel(
    decay_ref, q_ref, k_ref, v_ref, do_ref, ds_ref, dk_ref, dv_ref, d_s0_ref, d_state_ref, *, t_len: int, c: int
):
    step = pl.program_id(2)
    n = pl.num_programs(2)

    @pl.when(step == 0)
    def _():
        d_state_ref[...] = ds_ref[...].astype(jnp.float32)

    dk, dv, d_state = chunk_math.backward_dkv(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], d_state_ref[...], *_decays(decay_ref, n - 1 - step, c, t_len)
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    d_state_ref[...] = d_state

    @pl.when(step == n - 1)
    def _():
        d_s0_ref[...] = d_state.astype(d_s0_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def lightning_bwd(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"],
    d_out: Float[Array, "B T H V"],
    d_final_state: Float[Array, "B H K V"],
    *,
    block_size: int,
    interpret: Interpret,
) -> tuple[Float[Array, "B T H K"], Float[Array, "B T H K"], Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """Alg. 6: (dq, dk, dv in the inputs' dtypes, d_initial_state float32), two kernels."""
    b, t, h, k_dim = q.shape
    v_dim = v.shape[-1]
    c = chunk(block_size)
    n = pl.cdiv(t, c)
    qh, kh, vh, doh = (head_major(x, n * c) for x in (q, k, v, d_out))
    rates = decay.astype(jnp.float32)
    state_scratch = [pltpu.VMEM((k_dim, v_dim), jnp.float32)]
    dq = pl.pallas_call(
        functools.partial(lightning_bwd_dq_kernel, t_len=t, c=c),
        grid=(b, h, n),
        in_specs=[_DECAY_SPEC, chunk_spec(c, k_dim), chunk_spec(c, v_dim), chunk_spec(c, v_dim),
                  _state_spec(k_dim, v_dim)],
        out_specs=chunk_spec(c, k_dim),
        out_shape=out_struct((b, h, n * c, k_dim), q.dtype, q),
        scratch_shapes=state_scratch,
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dq(b, h, n, c, k_dim, v_dim, q.dtype.itemsize, mask_per_chunk=True),
        interpret=interpret,
        name="lightning_bwd_dq",
    )(rates, kh, vh, doh, initial_state.astype(jnp.float32))
    dk, dv, d_initial = pl.pallas_call(
        functools.partial(lightning_bwd_dkv_kernel, t_len=t, c=c),
        grid=(b, h, n),
        in_specs=[_DECAY_SPEC] + [chunk_spec(c, w, n) for w in (k_dim, k_dim, v_dim, v_dim)]
        + [_state_spec(k_dim, v_dim)],
        out_specs=[chunk_spec(c, k_dim, n), chunk_spec(c, v_dim, n), _state_spec(k_dim, v_dim)],
        out_shape=[
            out_struct((b, h, n * c, k_dim), k.dtype, q),
            out_struct((b, h, n * c, v_dim), v.dtype, q),
            out_struct((b, h, k_dim, v_dim), jnp.float32, q),
        ],
        scratch_shapes=state_scratch,
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dkv(b, h, n, c, k_dim, v_dim, q.dtype.itemsize, mask_per_chunk=True),
        interpret=interpret,
        name="lightning_bwd_dkv",
    )(rates, qh, kh, vh, doh, d_final_state.astype(jnp.float32))
    return time_major(dq, t), time_major(dk, t), time_major(dv, t), d_initial
