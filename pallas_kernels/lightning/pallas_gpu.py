"""Lightning attention on GPU: `pl.pallas_call` kernels (Triton lowering), forward and Alg. 6's two-pass backward.

Paper: Lightning Attention-2, arXiv 2401.04658, Alg. 5 / Alg. 6. Reference: OpenNLPLab/lightning-attention@d15c385,
lightning_attn/ops/triton/lightning_attn2.py (one program per (batch, head) walking the blocks).

Tiling (README.md, "Kernels"): grid (B, H), one program per (batch, head), both axes independent. The program walks
the N = ⌈T/C⌉ chunks in a `lax.fori_loop` and carries the [K, V] float32 state in registers: on a GPU the programs of
a grid run in parallel and in no order, so state is never carried across programs. q, k, v
stay in HBM in their [B, T, H, X] layout (no transpose); each step loads one [C, X] slice.

Triton's rule is that every load, store and value is a power-of-2-sized array and `tl.dot` needs each side ≥ 16, so
the kernels run at C, K, V rounded up to powers of 2 ≥ 16 (`tile`; 64 and 128 stay as they are). Any size works:
K and V are zero-padded (zero features add nothing to q·k, zero value columns and state rows/columns are sliced
off), T is zero-padded to a multiple of C, and the kernel gives the last chunk's L < C real tokens their own key
decays and λ^L (chunk_math.py), so all padding is exact. A chunk size other than the caller's changes only the
order of float32 sums.

The backward is two kernels (Alg. 6): pass 1 walks chunks in time order recomputing S and writes dQ; pass 2 walks
them in reverse carrying dS and writes dK, dV and the initial state's cotangent. Only q, k, v, decay and the initial
state are saved by the forward (api.py). The decay rates are a fixed schedule: the backward returns no cotangent for
them (api.py returns zeros, as every implementation does).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.lightning import chunk_math, cost
from effarch.pallas_kernels.triton_utils import compiler_params, pad, tile, time_spec
from effarch.pallas_kernels.vma import out_struct


def _pad_state(s, k_pad, v_pad):
    """[B, H, K, V] float32 zero-padded to [B, H, k_pad, v_pad]."""
    return jnp.pad(s.astype(jnp.float32), ((0, 0), (0, 0), (0, k_pad - s.shape[2]), (0, v_pad - s.shape[3])))


def _state_spec(k_dim, v_dim):
    return pl.BlockSpec((None, None, k_dim, v_dim), lambda b, h: (b, h, 0, 0))


def _decay_spec(heads):
    return pl.BlockSpec((heads,), lambda b, h: (0,))


def _chunk_length(i, c, t_len):
    return jnp.minimum(c, t_len - i * c)


def lightning_fwd_kernel(decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, s_out_ref, *, t_len: int, c: int):
    rate = decay_ref[pl.program_id(1)].astype(jnp.float32)
    mask, query = chunk_math.intra_decays(rate, c)

    def body(i, state):
        rows = pl.ds(i * c, c)
        key, block = chunk_math.inter_decays(rate, c, _chunk_length(i, c, t_len))
        o, state = chunk_math.forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], state, mask, query, key, block)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return state

    state = jax.lax.fori_loop(0, pl.cdiv(t_len, c), body, s0_ref[...].astype(jnp.float32))
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
    c, kp, vp = tile(block_size), tile(k_dim), tile(v_dim)
    t_pad = pl.cdiv(t, c) * c
    o, state = pl.pallas_call(
        functools.partial(lightning_fwd_kernel, t_len=t, c=c),
        grid=(b, h),
        in_specs=[
            _decay_spec(h),
            time_spec(t_pad, kp),
            time_spec(t_pad, kp),
            time_spec(t_pad, vp),
            _state_spec(kp, vp),
        ],
        out_specs=[time_spec(t_pad, vp), _state_spec(kp, vp)],
        out_shape=[
            out_struct((b, t_pad, h, vp), v.dtype, q),
            out_struct((b, h, kp, vp), jnp.float32, q),
        ],
        compiler_params=compiler_params(),
        cost_estimate=cost.forward(b, h, t_pad // c, c, kp, vp, q.dtype.itemsize, mask_per_chunk=False),
        interpret=interpret,
        name="lightning_fwd",
    )(decay.astype(jnp.float32), pad(q, t_pad, kp), pad(k, t_pad, kp), pad(v, t_pad, vp),
      _pad_state(initial_state, kp, vp))
    return o[:, :t, :, :v_dim], state[:, :, :k_dim, :v_dim]


def lightning_bwd_dq_kernel(decay_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, *, t_len: int, c: int):
    rate = decay_ref[pl.program_id(1)].astype(jnp.float32)
    mask, query = chunk_math.intra_decays(rate, c)

    def body(i, state):
        rows = pl.ds(i * c, c)
        key, block = chunk_math.inter_decays(rate, c, _chunk_length(i, c, t_len))
        dq, state = chunk_math.backward_dq(
            k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], state, mask, query, key, block
        )
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return state

    jax.lax.fori_loop(0, pl.cdiv(t_len, c), body, s0_ref[...].astype(jnp.float32))


def lightning_bwd_dkv_kernel(
    decay_ref, q_ref, k_ref, v_ref, do_ref, ds_ref, dk_ref, dv_ref, d_s0_ref, *, t_len: int, c: int
):
    rate = decay_ref[pl.program_id(1)].astype(jnp.float32)
    mask, query = chunk_math.intra_decays(rate, c)
    n = pl.cdiv(t_len, c)

    def body(step, d_state):
        i = n - 1 - step
        rows = pl.ds(i * c, c)
        key, block = chunk_math.inter_decays(rate, c, _chunk_length(i, c, t_len))
        dk, dv, d_state = chunk_math.backward_dkv(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], d_state, mask, query, key, block
        )
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return d_state

    d_state = jax.lax.fori_loop(0, n, body, ds_ref[...].astype(jnp.float32))
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
    c, k_pad, v_pad = tile(block_size), tile(k_dim), tile(v_dim)
    t_pad = pl.cdiv(t, c) * c
    qp, kp = pad(q, t_pad, k_pad), pad(k, t_pad, k_pad)
    vp, dop = pad(v, t_pad, v_pad), pad(d_out, t_pad, v_pad)
    rates = decay.astype(jnp.float32)
    dq = pl.pallas_call(
        functools.partial(lightning_bwd_dq_kernel, t_len=t, c=c),
        grid=(b, h),
        in_specs=[
            _decay_spec(h),
            time_spec(t_pad, k_pad),
            time_spec(t_pad, v_pad),
            time_spec(t_pad, v_pad),
            _state_spec(k_pad, v_pad),
        ],
        out_specs=time_spec(t_pad, k_pad),
        out_shape=out_struct((b, t_pad, h, k_pad), q.dtype, q),
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dq(b, h, t_pad // c, c, k_pad, v_pad, q.dtype.itemsize, mask_per_chunk=False),
        interpret=interpret,
        name="lightning_bwd_dq",
    )(rates, kp, vp, dop, _pad_state(initial_state, k_pad, v_pad))
    dk, dv, d_initial = pl.pallas_call(
        functools.partial(lightning_bwd_dkv_kernel, t_len=t, c=c),
        grid=(b, h),
        in_specs=[
            _decay_spec(h),
            time_spec(t_pad, k_pad),
            time_spec(t_pad, k_pad),
            time_spec(t_pad, v_pad),
            time_spec(t_pad, v_pad),
            _state_spec(k_pad, v_pad),
        ],
        out_specs=[time_spec(t_pad, k_pad), time_spec(t_pad, v_pad), _state_spec(k_pad, v_pad)],
        out_shape=[
            out_struct((b, t_pad, h, k_pad), k.dtype, q),
            out_struct((b, t_pad, h, v_pad), v.dtype, q),
            out_struct((b, h, k_pad, v_pad), jnp.float32, q),
        ],
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dkv(b, h, t_pad // c, c, k_pad, v_pad, q.dtype.itemsize, mask_per_chunk=False),
        interpret=interpret,
        name="lightning_bwd_dkv",
    )(rates, qp, kp, vp, dop, _pad_state(d_final_state, k_pad, v_pad))
    return (dq[:, :t, :, :k_dim], dk[:, :t, :, :k_dim], dv[:, :t, :, :v_dim],
            d_initial[:, :, :k_dim, :v_dim])
