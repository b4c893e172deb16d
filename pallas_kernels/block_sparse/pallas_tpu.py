"""Block-sparse attention on TPU: Mosaic `pl.pallas_call` kernels over scalar-prefetched block lists, forward and
backward (dQ over the lists, dK/dV over the transposed lists).

The grid is shrunk to the listed blocks as splash attention's `MaskInfo` does: `block_idx` / `block_cnt` (flattened
to 1-D int32) are scalar-prefetched into SMEM, and the forward's grid is (B, Hp, nQb, Kmax). Step c of query block I
reads key block J = block_idx[b, g, I, min(c, cnt - 1)] (clamped to [0, nKb)) through the K/V index maps, so the
steps c ≥ cnt name the block already in VMEM and the pipeline copies nothing for them; they compute nothing either
(`pl.when(c < cnt)`). The running max, sum and output of the online softmax live in VMEM scratch across the c axis
("arbitrary"), initialised at c == 0, and o and the log-sum-exp are written at c == Kmax - 1 whatever cnt is, so a
row that sees nothing is written (o = 0, lse = -inf). Token predicates inside a block come from positions
(layout.py `visible`).

Backward (FA2-style recompute from the saved lse): dQ runs the forward's grid and lists. dK/dV run a grid (B, Hp,
nQb · Kmax) over the key-major pairs of transpose.py (pair code J · nQb + I, scalar-prefetched like the lists, so the
grid and SMEM are the forward's size whatever the lists): each key block's pairs are one run of consecutive steps,
accumulated in VMEM scratch from the run's first step and written at its last (the output block stays in VMEM while
its index holds); steps past the valid pairs repeat the last pair and compute nothing, and key blocks no list names
are zeroed after the call. A program takes gq query heads at once (layout.py): with a list per GQA group the group's
heads share one K/V block load, and dK/dV of the group sum over their rows in one matmul; with a list per query head,
dK/dV come out per query head in float32 and are summed over the group outside.

Mosaic's block rule (last two block dims multiples of (8, 128) or the full dims): tiles are bq, bk = q_block,
kv_block rounded up to multiples of 16 rows (bf16 packs 16 rows per sublane tile; layout.py pads inside each block),
the head dims are zero-padded to multiples of 128 lanes, and row vectors (lse, its cotangent term, positions) are
[.., T, 1] and [.., 1, bk] arrays whose last dims are full. Products accumulate in float32; probabilities are cast to
the value dtype before the p·V product (bf16 inputs stay on the MXU's bf16 path).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
from effarch.pallas_kernels.vma import out_struct

ROWS = 16  # tile rows: a multiple of 16 fills whole bf16-packed sublane tiles
LANES = 128


def row_tile(block: int) -> int:
    return -(-block // ROWS) * ROWS


def lane_tile(d: int) -> int:
    return -(-d // LANES) * LANES


def heads_per_program(n_groups: int, n_q_heads: int, n_kv_heads: int) -> int:
    """gq (layout.py): a GQA group's heads together unless each query head has its own list."""
    G = n_q_heads // n_kv_heads
    return 1 if n_groups == n_q_heads and G > 1 else G


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _listed(lists_ref, cnt_ref, row, c, length, n_blocks):
    """The block at slot c of list `row`: the last listed one for c ≥ cnt (no new copy), block 0 for an empty list."""
    n = cnt_ref[row]
    slot = jnp.minimum(c, jnp.maximum(n - 1, 0))
    return jnp.clip(lists_ref[row * length + slot], 0, n_blocks - 1)


def _rows(x, gq):
    """[bq, 1] row values repeated for the gq heads of a program: [gq · bq, 1]."""
    return x if gq == 1 else jnp.concatenate([x] * gq, axis=0)


def _program_specs(t: Tiling, gq, dp, dvp):
    """BlockSpecs of the forward/dQ grid (b, h, i, c): query-side blocks at i, key-side blocks at the listed J."""

    def row(b, h, i):
        return (b * t.n_groups + t.list_group(h)) * t.n_q_blocks + i

    def key(b, h, i, c, idx_ref, cnt_ref, *_):
        return _listed(idx_ref, cnt_ref, row(b, h, i), c, t.kmax, t.n_kv_blocks)

    q_side = {
        "q": pl.BlockSpec((None, None, gq, t.bq, dp), lambda b, h, i, c, *_: (b, h, 0, i, 0)),
        "o": pl.BlockSpec((None, None, gq, t.bq, dvp), lambda b, h, i, c, *_: (b, h, 0, i, 0)),
        "row": pl.BlockSpec((None, None, gq, t.bq, 1), lambda b, h, i, c, *_: (b, h, 0, i, 0)),
        "pos": pl.BlockSpec((None, t.bq, 1), lambda b, h, i, c, *_: (b, i, 0)),
    }
    k_side = {
        "k": pl.BlockSpec((None, None, t.bk, dp), lambda b, h, i, c, *r: (b, t.kv_head(h), key(b, h, i, c, *r), 0)),
        "v": pl.BlockSpec((None, None, t.bk, dvp), lambda b, h, i, c, *r: (b, t.kv_head(h), key(b, h, i, c, *r), 0)),
        "pos": pl.BlockSpec((None, None, 1, t.bk), lambda b, h, i, c, *r: (b, key(b, h, i, c, *r), 0, 0)),
    }
    return q_side, k_side


def _block_of(code, t: Tiling):
    """Key block J of pair code J · nQb + I (codes are non-negative: lax.div, not floor division, which Mosaic
    lowers through a sign it cannot take on scalars)."""
    return jax.lax.div(code, t.n_q_blocks)


def _pair_specs(t: Tiling, gq, dp, dvp, n_pairs):
    """BlockSpecs of the dK/dV grid (b, h, s): slot s of the key-major pairs (transpose.py) of the program's list
    group, pair code J · nQb + I; query-side blocks at I, key-side blocks and the dK/dV outputs at J."""

    def code(b, h, s, codes_ref):
        return codes_ref[(b * t.n_groups + t.list_group(h)) * n_pairs + s]

    def query(b, h, s, codes_ref, *_):
        return jax.lax.rem(code(b, h, s, codes_ref), t.n_q_blocks)

    def key(b, h, s, codes_ref, *_):
        return jax.lax.div(code(b, h, s, codes_ref), t.n_q_blocks)

    q_side = {
        "q": pl.BlockSpec((None, None, gq, t.bq, dp), lambda b, h, s, *r: (b, h, 0, query(b, h, s, *r), 0)),
        "o": pl.BlockSpec((None, None, gq, t.bq, dvp), lambda b, h, s, *r: (b, h, 0, query(b, h, s, *r), 0)),
        "row": pl.BlockSpec((None, None, gq, t.bq, 1), lambda b, h, s, *r: (b, h, 0, query(b, h, s, *r), 0)),
        "pos": pl.BlockSpec((None, t.bq, 1), lambda b, h, s, *r: (b, query(b, h, s, *r), 0)),
    }
    k_side = {
        "k": pl.BlockSpec((None, None, t.bk, dp), lambda b, h, s, *r: (b, t.kv_head(h), key(b, h, s, *r), 0)),
        "v": pl.BlockSpec((None, None, t.bk, dvp), lambda b, h, s, *r: (b, t.kv_head(h), key(b, h, s, *r), 0)),
        "out_k": pl.BlockSpec((None, None, t.bk, dp), lambda b, h, s, *r: (b, h, key(b, h, s, *r), 0)),
        "out_v": pl.BlockSpec((None, None, t.bk, dvp), lambda b, h, s, *r: (b, h, key(b, h, s, *r), 0)),
        "pos": pl.BlockSpec((None, None, 1, t.bk), lambda b, h, s, *r: (b, key(b, h, s, *r), 0, 0)),
    }
    return q_side, k_side


def _predicate(t, gq, g, qp_ref, kp_ref, qs_ref, ks_ref, win_ref, sink_ref):
    """visible() for the program's rows; g: its list group, read at the kernel's top level (the HLO interpreter does
    not substitute program_id inside a pl.when branch)."""
    return visible(t, _rows(qp_ref[...], gq), kp_ref[...], _rows(qs_ref[...], gq), ks_ref[...], win_ref[g],
                   sink_ref[g])


def _fwd_kernel(idx_ref, cnt_ref, win_ref, sink_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, t: Tiling):
    b, h, i, c = (pl.program_id(a) for a in range(4))
    gq = q_ref.shape[0]
    n = cnt_ref[(b * t.n_groups + t.list_group(h)) * t.n_q_blocks + i]

    @pl.when(c == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -1e30, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(c < n)
    def _():
        q = q_ref[...].reshape(gq * t.bq, q_ref.shape[-1])
        s = dot_nt(q, k_ref[...]) * t.scale
        vis = _predicate(t, gq, t.list_group(h), qp_ref, kp_ref, qs_ref, ks_ref, win_ref, sink_ref)
        m_sc[...], l_sc[...], acc_sc[...] = softmax_step(s, vis, m_sc[...], l_sc[...], acc_sc[...], v_ref[...],
                                                         p_dtype=v_ref.dtype)

    @pl.when(c == t.kmax - 1)
    def _():
        o, lse = finish(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o.reshape(o_ref.shape).astype(o_ref.dtype)
        lse_ref[...] = lse.reshape(lse_ref.shape)


def forward(t: Tiling, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink, *, interpret: Interpret):
    """(o [B, Hp, gq, Tq_p, Dvp] in q's dtype, lse [B, Hp, gq, Tq_p, 1] float32) in the kernel layout."""
    B, Hp, gq, Tq_p, dp = qk.shape
    dvp = vk.shape[-1]
    q_side, k_side = _program_specs(t, gq, dp, dvp)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, t=t),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, Hp, t.n_q_blocks, t.kmax),
            in_specs=[q_side["q"], k_side["k"], k_side["v"], q_side["pos"], k_side["pos"], q_side["pos"],
                      k_side["pos"]],
            out_specs=[q_side["o"], q_side["row"]],
            scratch_shapes=[pltpu.VMEM((gq * t.bq, 1), jnp.float32), pltpu.VMEM((gq * t.bq, 1), jnp.float32),
                            pltpu.VMEM((gq * t.bq, dvp), jnp.float32)],
        ),
        out_shape=[out_struct((B, Hp, gq, Tq_p, dvp), qk.dtype, qk), out_struct((B, Hp, gq, Tq_p, 1), jnp.float32, qk)],
        compiler_params=_compiler_params(),
        cost_estimate=cost.forward(t, B, Hp, gq, dp, dvp, qk.dtype.itemsize),
        interpret=interpret,
        name="block_sparse_fwd",
    )(idx, cnt, window, sink, qk, kk, vk, qpos, kpos, qseg, kseg)


def _dq_kernel(idx_ref, cnt_ref, win_ref, sink_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref,
               qs_ref, ks_ref, dq_ref, dq_sc, *, t: Tiling):
    b, h, i, c = (pl.program_id(a) for a in range(4))
    gq = q_ref.shape[0]
    rows = gq * t.bq
    n = cnt_ref[(b * t.n_groups + t.list_group(h)) * t.n_q_blocks + i]

    @pl.when(c == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(c < n)
    def _():
        k = k_ref[...]
        s = dot_nt(q_ref[...].reshape(rows, q_ref.shape[-1]), k) * t.scale
        vis = _predicate(t, gq, t.list_group(h), qp_ref, kp_ref, qs_ref, ks_ref, win_ref, sink_ref)
        p = probabilities(s, vis, lse_ref[...].reshape(rows, 1))
        dp = dot_nt(do_ref[...].reshape(rows, do_ref.shape[-1]), v_ref[...])
        ds = p * (dp - delta_ref[...].reshape(rows, 1))
        dq_sc[...] += dot_nn(ds.astype(k.dtype), k) * t.scale

    @pl.when(c == t.kmax - 1)
    def _():
        dq_ref[...] = dq_sc[...].reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(codes_ref, n_ref, win_ref, sink_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref,
                kp_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, t: Tiling, n_pairs: int):
    b, h, s = (pl.program_id(a) for a in range(3))
    gq = q_ref.shape[0]
    rows = gq * t.bq
    row = b * t.n_groups + t.list_group(h)
    base = row * n_pairs
    key = _block_of(codes_ref[base + s], t)
    # A key block's pairs are one run of consecutive slots: start it at the run's first slot, write at its last
    # (the output block stays in VMEM while its index does not change).
    first = (s == 0) | (_block_of(codes_ref[base + jnp.maximum(s - 1, 0)], t) != key)
    last = (s == n_pairs - 1) | (_block_of(codes_ref[base + jnp.minimum(s + 1, n_pairs - 1)], t) != key)

    @pl.when(first)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(s < n_ref[row])
    def _():
        q = q_ref[...].reshape(rows, q_ref.shape[-1])
        do = do_ref[...].reshape(rows, do_ref.shape[-1])
        sc = dot_nt(q, k_ref[...]) * t.scale
        vis = _predicate(t, gq, t.list_group(h), qp_ref, kp_ref, qs_ref, ks_ref, win_ref, sink_ref)
        p = probabilities(sc, vis, lse_ref[...].reshape(rows, 1))
        dv_sc[...] += dot_tn(p.astype(do.dtype), do)
        dp = dot_nt(do, v_ref[...])
        ds = p * (dp - delta_ref[...].reshape(rows, 1))
        dk_sc[...] += dot_tn(ds.astype(q.dtype), q) * t.scale

    @pl.when(last)
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(t: Tiling, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, transposed, window, sink, d_o, lse, delta,
             *, interpret: Interpret):
    """(dq [B, Hp, gq, Tq_p, Dp], dk [B, Hp, Tk_p, Dp], dv [B, Hp, Tk_p, Dvp]) in the kernel layout; dk, dv per
    program head (float32 when gq == 1 and G > 1: the caller sums them over the group). `transposed`: the
    key-major pairs of transpose.py."""
    B, Hp, gq, Tq_p, dp = qk.shape
    Tk_p, dvp = kk.shape[2], vk.shape[-1]
    q_side, k_side = _program_specs(t, gq, dp, dvp)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, t=t),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, Hp, t.n_q_blocks, t.kmax),
            in_specs=[q_side["q"], k_side["k"], k_side["v"], q_side["o"], q_side["row"], q_side["row"],
                      q_side["pos"], k_side["pos"], q_side["pos"], k_side["pos"]],
            out_specs=q_side["q"],
            scratch_shapes=[pltpu.VMEM((gq * t.bq, dp), jnp.float32)],
        ),
        out_shape=out_struct(qk.shape, qk.dtype, qk),
        compiler_params=_compiler_params(),
        cost_estimate=cost.backward_dq(t, B, Hp, gq, dp, dvp, qk.dtype.itemsize),
        interpret=interpret,
        name="block_sparse_bwd_dq",
    )(idx, cnt, window, sink, qk, kk, vk, d_o, lse, delta, qpos, kpos, qseg, kseg)

    pair_q, pair_k, _, q_cnt, n_valid = transposed
    n_pairs = pair_q.shape[-1]
    codes = (pair_k * t.n_q_blocks + pair_q).reshape(-1)
    q_side, k_side = _pair_specs(t, gq, dp, dvp, n_pairs)
    summed = Hp != kk.shape[1]  # one program per query head: dK/dV summed over the group outside, in float32
    dk_dtype, dv_dtype = (jnp.float32, jnp.float32) if summed else (kk.dtype, vk.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t, n_pairs=n_pairs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, Hp, n_pairs),
            in_specs=[q_side["q"], k_side["k"], k_side["v"], q_side["o"], q_side["row"], q_side["row"],
                      q_side["pos"], k_side["pos"], q_side["pos"], k_side["pos"]],
            out_specs=[k_side["out_k"], k_side["out_v"]],
            scratch_shapes=[pltpu.VMEM((t.bk, dp), jnp.float32), pltpu.VMEM((t.bk, dvp), jnp.float32)],
        ),
        out_shape=[out_struct((B, Hp, Tk_p, dp), dk_dtype, qk), out_struct((B, Hp, Tk_p, dvp), dv_dtype, qk)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost.backward_dkv(t, B, Hp, gq, dp, dvp, qk.dtype.itemsize),
        interpret=interpret,
        name="block_sparse_bwd_dkv",
    )(codes, n_valid.reshape(-1), window, sink, qk, kk, vk, d_o, lse, delta, qpos, kpos, qseg, kseg)
    # Key blocks that no list names are never visited: their output blocks hold whatever was there; zero them.
    heads = jnp.asarray([0 if t.n_groups == 1 else h for h in range(Hp)])  # program head h reads list group h
    named = (q_cnt[:, heads] > 0)[:, :, :, None, None]  # [B, Hp, nKb, 1, 1]
    dk = jnp.where(named, dk.reshape(B, Hp, t.n_kv_blocks, t.bk, dp), 0).reshape(dk.shape)
    dv = jnp.where(named, dv.reshape(B, Hp, t.n_kv_blocks, t.bk, dvp), 0).reshape(dv.shape)
    return dq, dk, dv
