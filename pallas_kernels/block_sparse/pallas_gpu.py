"""Block-sparse attention on GPU: `pl.pallas_call` kernels (Triton lowering), forward and backward (dQ over the
lists, dK/dV over the key-major pairs of transpose.py).

Grid (nQb, B · Hq), one program per (query block, batch row, query head); programs run in parallel and in no order,
so nothing is carried across them. A program reads its list's count and walks `c < block_cnt` in a `lax.fori_loop`
with that dynamic bound, loading J = block_idx[b, g, I, c] (clamped to [0, nKb)) and the `pl.ds(J · bk, bk)` rows of
K and V, with the online softmax (m, l, acc) carried in registers (float32); it writes o and the log-sum-exp once at
the end, so a row that sees nothing gets o = 0, lse = -inf. K, V, positions and the lists stay whole arrays in global
memory; each program slices what it reads. Token predicates inside a block come from positions (layout.py).

Backward (FA2-style recompute from the saved lse): dQ runs the forward's grid and loop; dK/dV run a grid (nKb,
B · Hq) whose program walks its key block's run of the key-major pairs (transpose.py) with a dynamic bound, loading
the `pl.ds(I · bq, bq)` rows of q, dO, lse and delta. Each program owns its dK/dV block, so there are no atomics;
with GQA they come out per query head in float32 and are summed over the group outside (pallas_vjp.py).

Triton's rules (every value a power-of-2-sized array, `tl.dot` sides ≥ 16) set the tiles: bq, bk = q_block,
kv_block rounded up to powers of 2 ≥ 16 (padded inside each block, layout.py) and the head dims zero-padded the same
way (triton_utils.py `tile`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effarch.pallas_kernels.block_sparse import cost
from effarch.pallas_kernels.block_sparse.layout import (
    Tiling,
    dot_nn,
    dot_nt,
    dot_tn,
    finish,
    probabilities,
    softmax_step,
    visible,
)
from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.triton_utils import compiler_params, tile
from effarch.pallas_kernels.vma import out_struct


def row_tile(block: int) -> int:
    return tile(block)


def lane_tile(d: int) -> int:
    return tile(d)


def heads_per_program(n_groups: int, n_q_heads: int, n_kv_heads: int) -> int:
    """One query head per program (a GQA group's K/V blocks are re-read from L2 by its heads' programs)."""
    return 1


def _whole(shape):
    """The whole array for every program (the kernel slices it with pl.ds)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _program(n_q_heads):
    """(b, h) of program axis 1 = b · Hq + h."""
    bh = pl.program_id(1)
    return jax.lax.div(bh, n_q_heads), jax.lax.rem(bh, n_q_heads)


def _q_specs(t: Tiling, n_q_heads, tq, dp, dvp, whole: bool):
    """The query side of one (batch, head): one [bq, X] block at program axis 0, or the whole sequence."""
    def index(i, bh):
        return (jax.lax.div(bh, n_q_heads), jax.lax.rem(bh, n_q_heads), 0, 0 if whole else i, 0)

    rows = tq if whole else t.bq
    return (pl.BlockSpec((None, None, None, rows, dp), index), pl.BlockSpec((None, None, None, rows, dvp), index),
            pl.BlockSpec((None, None, None, rows, 1), index),
            pl.BlockSpec((None, rows, 1), lambda i, bh: (jax.lax.div(bh, n_q_heads), 0 if whole else i, 0)))


def _k_specs(t: Tiling, n_q_heads, tk, dp, dvp, whole: bool):
    """The key side of one (batch, KV head): the whole sequence, or one [bk, X] block at program axis 0."""
    def index(j, bh):
        return (jax.lax.div(bh, n_q_heads), t.kv_head(jax.lax.rem(bh, n_q_heads)), 0 if whole else j, 0)

    rows = tk if whole else t.bk
    return (pl.BlockSpec((None, None, rows, dp), index), pl.BlockSpec((None, None, rows, dvp), index),
            pl.BlockSpec((None, 1, rows), lambda j, bh: (jax.lax.div(bh, n_q_heads), 0, 0 if whole else j)))


def _fwd_kernel(idx_ref, cnt_ref, win_ref, sink_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref,
                lse_ref, *, t: Tiling, n_q_heads: int):
    i = pl.program_id(0)
    b, h = _program(n_q_heads)
    g = t.list_group(h)
    row = (b * t.n_groups + g) * t.n_q_blocks + i
    q, qp, qs = q_ref[...], qp_ref[...], qs_ref[...]
    window, sink = win_ref[g], sink_ref[g]

    def body(c, carry):
        j = jnp.clip(idx_ref[row * t.kmax + c], 0, t.n_kv_blocks - 1)
        keys = pl.ds(j * t.bk, t.bk)
        s = dot_nt(q, k_ref[keys, :]) * t.scale
        vis = visible(t, qp, kp_ref[:, keys], qs, ks_ref[:, keys], window, sink)
        return softmax_step(s, vis, *carry, v_ref[keys, :], p_dtype=v_ref.dtype)

    init = (jnp.full((t.bq, 1), -1e30, jnp.float32), jnp.zeros((t.bq, 1), jnp.float32),
            jnp.zeros((t.bq, v_ref.shape[-1]), jnp.float32))
    m, row_sum, acc = jax.lax.fori_loop(0, jnp.minimum(cnt_ref[row], t.kmax), body, init)
    o, lse = finish(m, row_sum, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _gpu_layout(qk, kpos, kseg):
    """Key positions/segments as [B, 1, Tk_p] rows (the shared layout's [B, nKb, 1, bk], same memory)."""
    B = qk.shape[0]
    return kpos.reshape(B, 1, -1), kseg.reshape(B, 1, -1)


def forward(t: Tiling, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink, *, interpret: Interpret):
    """(o [B, Hq, 1, Tq_p, Dvp] in q's dtype, lse [B, Hq, 1, Tq_p, 1] float32) in the kernel layout."""
    B, Hq, _, tq, dp = qk.shape
    tk, dvp = kk.shape[2], vk.shape[-1]
    kpos, kseg = _gpu_layout(qk, kpos, kseg)
    q_spec, o_spec, row_spec, qpos_spec = _q_specs(t, Hq, tq, dp, dvp, whole=False)
    k_spec, v_spec, kpos_spec = _k_specs(t, Hq, tk, dp, dvp, whole=True)
    scalars = [_whole(x.shape) for x in (idx, cnt, window, sink)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, t=t, n_q_heads=Hq),
        grid=(t.n_q_blocks, B * Hq),
        in_specs=[*scalars, q_spec, k_spec, v_spec, qpos_spec, kpos_spec, qpos_spec, kpos_spec],
        out_specs=[o_spec, row_spec],
        out_shape=[out_struct((B, Hq, 1, tq, dvp), qk.dtype, qk), out_struct((B, Hq, 1, tq, 1), jnp.float32, qk)],
        compiler_params=compiler_params(),
        cost_estimate=cost.forward(t, B, Hq, 1, dp, dvp, qk.dtype.itemsize),
        interpret=interpret,
        name="block_sparse_fwd",
    )(idx, cnt, window, sink, qk, kk, vk, qpos, kpos, qseg, kseg)


def _dq_kernel(idx_ref, cnt_ref, win_ref, sink_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref,
               qs_ref, ks_ref, dq_ref, *, t: Tiling, n_q_heads: int):
    i = pl.program_id(0)
    b, h = _program(n_q_heads)
    g = t.list_group(h)
    row = (b * t.n_groups + g) * t.n_q_blocks + i
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    window, sink = win_ref[g], sink_ref[g]

    def body(c, dq):
        j = jnp.clip(idx_ref[row * t.kmax + c], 0, t.n_kv_blocks - 1)
        keys = pl.ds(j * t.bk, t.bk)
        k = k_ref[keys, :]
        s = dot_nt(q, k) * t.scale
        p = probabilities(s, visible(t, qp, kp_ref[:, keys], qs, ks_ref[:, keys], window, sink), lse)
        ds = p * (dot_nt(do, v_ref[keys, :]) - delta)
        return dq + dot_nn(ds.astype(k.dtype), k) * t.scale

    dq = jax.lax.fori_loop(0, jnp.minimum(cnt_ref[row], t.kmax), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(pair_q_ref, start_ref, q_cnt_ref, win_ref, sink_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qp_ref, kp_ref, qs_ref, ks_ref, dk_ref, dv_ref, *, t: Tiling, n_q_heads: int, n_pairs: int):
    j = pl.program_id(0)
    b, h = _program(n_q_heads)
    g = t.list_group(h)
    row = b * t.n_groups + g
    k, v, kp, ks = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]
    window, sink = win_ref[g], sink_ref[g]
    first = start_ref[row * t.n_kv_blocks + j]

    def body(c, carry):
        dk, dv = carry
        i = pair_q_ref[row * n_pairs + first + c]
        queries = pl.ds(i * t.bq, t.bq)
        q, do = q_ref[queries, :], do_ref[queries, :]
        s = dot_nt(q, k) * t.scale
        vis = visible(t, qp_ref[queries, :], kp, qs_ref[queries, :], ks, window, sink)
        p = probabilities(s, vis, lse_ref[queries, :])
        ds = p * (dot_nt(do, v) - delta_ref[queries, :])
        return dk + dot_tn(ds.astype(q.dtype), q) * t.scale, dv + dot_tn(p.astype(do.dtype), do)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, q_cnt_ref[row * t.n_kv_blocks + j], body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(t: Tiling, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, transposed, window, sink, d_o, lse, delta,
             *, interpret: Interpret):
    """(dq [B, Hq, 1, Tq_p, Dp], dk [B, Hq, Tk_p, Dp], dv [B, Hq, Tk_p, Dvp]) in the kernel layout; dk, dv per query
    head (float32 with GQA: the caller sums them over the group). `transposed`: transpose.py's key-major pairs."""
    B, Hq, _, tq, dp = qk.shape
    tk, dvp = kk.shape[2], vk.shape[-1]
    kpos, kseg = _gpu_layout(qk, kpos, kseg)
    q_spec, o_spec, row_spec, qpos_spec = _q_specs(t, Hq, tq, dp, dvp, whole=False)
    k_spec, v_spec, kpos_spec = _k_specs(t, Hq, tk, dp, dvp, whole=True)
    scalars = [_whole(x.shape) for x in (idx, cnt, window, sink)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, t=t, n_q_heads=Hq),
        grid=(t.n_q_blocks, B * Hq),
        in_specs=[*scalars, q_spec, k_spec, v_spec, o_spec, row_spec, row_spec, qpos_spec, kpos_spec, qpos_spec,
                  kpos_spec],
        out_specs=q_spec,
        out_shape=out_struct(qk.shape, qk.dtype, qk),
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dq(t, B, Hq, 1, dp, dvp, qk.dtype.itemsize),
        interpret=interpret,
        name="block_sparse_bwd_dq",
    )(idx, cnt, window, sink, qk, kk, vk, d_o, lse, delta, qpos, kpos, qseg, kseg)

    pair_q, _, start, q_cnt, _ = transposed
    n_pairs = pair_q.shape[-1]
    pair_q, start, q_cnt = pair_q.reshape(-1), start.reshape(-1), q_cnt.reshape(-1)
    q_spec, o_spec, row_spec, qpos_spec = _q_specs(t, Hq, tq, dp, dvp, whole=True)
    k_spec, v_spec, kpos_spec = _k_specs(t, Hq, tk, dp, dvp, whole=False)
    summed = Hq != kk.shape[1]
    dk_dtype, dv_dtype = (jnp.float32, jnp.float32) if summed else (kk.dtype, vk.dtype)

    def out_index(j, bh):
        return jax.lax.div(bh, Hq), jax.lax.rem(bh, Hq), j, 0

    scalars = [_whole(x.shape) for x in (pair_q, start, q_cnt, window, sink)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t, n_q_heads=Hq, n_pairs=n_pairs),
        grid=(t.n_kv_blocks, B * Hq),
        in_specs=[*scalars, q_spec, k_spec, v_spec, o_spec, row_spec, row_spec, qpos_spec, kpos_spec, qpos_spec,
                  kpos_spec],
        out_specs=[pl.BlockSpec((None, None, t.bk, dp), out_index), pl.BlockSpec((None, None, t.bk, dvp), out_index)],
        out_shape=[out_struct((B, Hq, tk, dp), dk_dtype, qk), out_struct((B, Hq, tk, dvp), dv_dtype, qk)],
        compiler_params=compiler_params(),
        cost_estimate=cost.backward_dkv(t, B, Hq, 1, dp, dvp, qk.dtype.itemsize),
        interpret=interpret,
        name="block_sparse_bwd_dkv",
    )(pair_q, start, q_cnt, window, sink, qk, kk, vk, d_o, lse, delta, qpos, kpos, qseg, kseg)
    return dq, dk, dv
