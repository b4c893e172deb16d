"""sparse_decode_attention on GPU: one `pl.pallas_call` (Triton lowering), flash-decoding style.

Grid (B · Hp, splits): one program per (batch row, program head, split) (decode_layout.py: a program's R rows are
the query heads that share a list and a KV head). A list's loop steps are cut into `splits` equal ranges, one per
program (FlashDecoding's split-k: a decode step has too few (batch, head) pairs to fill the GPU otherwise); each
program walks its range with a dynamic `lax.fori_loop` bound (the steps past the list's count are never visited),
reading `chunk` cache rows per step (decode_layout.py: a listed block's contiguous rows, `pl.ds(start, chunk)`, or
`chunk` listed tokens gathered by an integer-array index, which Triton lowers to one pointer load), with the online
softmax (m, l, acc; float32) in registers. Each program writes its partial o and log-sum-exp (o = 0, lse = −inf for
a range that saw nothing); decode_pallas.py merges the splits by lse.

The caches stay [B, S, Hkv, D] in global memory: each program's K/V ref is one (batch row, KV head) view of the whole
sequence, and only the selected rows are loaded. Triton's rules (every value a power-of-2-sized array, `tl.dot`
sides ≥ 16) set the tiles: R and chunk are powers of 2 ≥ 16 (zero query rows, masked cache rows), and a head dim that
is not a power of 2 ≥ 16 is zero-padded by the caller (a copy of the cache: real head dims of 64 or 128 take none).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effarch.pallas_kernels.block_sparse.decode_layout import DecodeTiling, cost
from effarch.pallas_kernels.block_sparse.layout import dot_nt, finish, softmax_step
from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.triton_utils import compiler_params, tile
from effarch.pallas_kernels.vma import out_struct


def row_tile(rows: int) -> int:
    return tile(rows)


def lane_tile(d: int) -> int:
    return tile(d)


def chunk_rows(granularity: str, block: int, chunk: int | None) -> int:
    """Cache rows per step: a listed block rounded up to a power of 2 ≥ 16, or `chunk` (default 32) tokens."""
    return tile(block) if granularity == "block" else tile(chunk or 32)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _kernel(idx_ref, cnt_ref, len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, t: DecodeTiling):
    bp, split = pl.program_id(0), pl.program_id(1)
    b = jax.lax.div(bp, t.n_programs)
    p = jax.lax.rem(bp, t.n_programs)
    row = b * t.n_groups + t.list_group(p)
    n = jnp.clip(cnt_ref[row], 0, t.kmax)
    length = jnp.minimum(len_ref[b], t.s)
    per = -(-t.n_steps // t.splits)
    lo = split * per
    hi = jnp.maximum(lo, jnp.minimum(lo + per, t.steps_of(n)))
    q = q_ref[...]
    offsets = jnp.arange(t.chunk, dtype=jnp.int32)

    def body(c, carry):
        if t.granularity == "block":
            first = idx_ref[row * t.kmax + c] * t.block
            start = jnp.clip(first, 0, t.s - t.chunk)
            pos = start + offsets
            ok = (pos >= first) & (pos < first + t.block) & (pos < length)
            rows = pl.ds(start, t.chunk)
        else:
            ids = idx_ref[pl.ds(row * t.kmax + c * t.chunk, t.chunk)]
            ok = (c * t.chunk + offsets < n) & (ids >= 0) & (ids < length)
            rows = jnp.clip(ids, 0, t.s - 1)  # a gather of the listed rows (masked after)
        k = k_ref[rows, :].astype(q.dtype)  # the xla path's rule: keys in q's dtype, values at least as precise
        v = v_ref[rows, :]
        v = v.astype(jnp.promote_types(v.dtype, q.dtype))
        s = dot_nt(q, k) * t.scale
        vis = jnp.broadcast_to(ok[None, :], s.shape)
        return softmax_step(s, vis, *carry, v, p_dtype=v.dtype)

    init = (jnp.full((t.rows, 1), -1e30, jnp.float32), jnp.zeros((t.rows, 1), jnp.float32),
            jnp.zeros((t.rows, v_ref.shape[-1]), jnp.float32))
    m, row_sum, acc = jax.lax.fori_loop(lo, hi, body, init)
    o, lse = finish(m, row_sum, acc)
    o_ref[...] = o
    lse_ref[...] = lse


def decode(t: DecodeTiling, q, k_cache, v_cache, idx, cnt, lengths, *, interpret: Interpret):
    """(o [B, Hp, splits, R, Dvp], lse [B, Hp, splits, R, 1]), both float32, one partial per split.

    q [B, Hp, R, Dp]; k_cache [B, S, Hkv, Dp], v_cache [B, S, Hkv, Dvp]; idx [B · Hs · kmax], cnt [B · Hs],
    lengths [B] (int32)."""
    B, Hp, R, dp = q.shape
    dvp = v_cache.shape[-1]

    def q_index(bp, s):
        return jax.lax.div(bp, Hp), jax.lax.rem(bp, Hp), 0, 0

    def kv_index(bp, s):
        return jax.lax.div(bp, Hp), 0, t.kv_head(jax.lax.rem(bp, Hp), jax.lax.div), 0

    def out_index(bp, s):
        return jax.lax.div(bp, Hp), jax.lax.rem(bp, Hp), s, 0, 0

    return pl.pallas_call(
        functools.partial(_kernel, t=t),
        grid=(B * Hp, t.splits),
        in_specs=[_whole(idx.shape), _whole(cnt.shape), _whole(lengths.shape),
                  pl.BlockSpec((None, None, R, dp), q_index),
                  pl.BlockSpec((None, t.s, None, dp), kv_index), pl.BlockSpec((None, t.s, None, dvp), kv_index)],
        out_specs=[pl.BlockSpec((None, None, None, R, dvp), out_index),
                   pl.BlockSpec((None, None, None, R, 1), out_index)],
        out_shape=[out_struct((B, Hp, t.splits, R, dvp), jnp.float32, q),
                   out_struct((B, Hp, t.splits, R, 1), jnp.float32, q)],
        compiler_params=compiler_params(),
        cost_estimate=cost(t, B, dp, dvp, k_cache.dtype.itemsize),
        interpret=interpret,
        name="sparse_decode",
    )(idx, cnt, lengths, q, k_cache, v_cache)
