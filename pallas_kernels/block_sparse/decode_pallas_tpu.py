"""sparse_decode_attention on TPU: one Mosaic `pl.pallas_call` over scalar-prefetched lists, the selected cache rows
copied by DMA.

Grid (B, Hp, n_steps): one program per (batch row, program head) (decode_layout.py: its R rows are the query heads
that share a list and a KV head), walking its list's steps on the "arbitrary" last axis with the online softmax
(m, l, acc; float32) in VMEM scratch, initialised at step 0 and written at the last step whatever the count, so a row
that sees nothing gets o = 0, lse = −inf. The lists, counts and lengths are scalar-prefetched into SMEM.

The caches stay in HBM as [B, S, Hkv, D] (`memory_space=pl.ANY`): a BlockSpec cannot name a listed token, nor a
block whose start is not a multiple of its size, so each step copies its rows into VMEM itself
(`pltpu.make_async_copy`): a listed block is one DMA of `chunk` contiguous rows from the clamped start
(decode_layout.py), `chunk` listed tokens are `chunk` one-row DMAs (ids clamped into [0, S)). Steps past the list's
count copy and compute nothing (`pl.when`). Double buffering, as jax's paged attention does: two VMEM slots and
two DMA semaphores per cache; step c starts the copies of step c + 1 into the other slot before it waits for its
own, so the next step's rows are in flight during this step's compute (step 0 starts its own). For token lists
the ids also come to VMEM as a [1, chunk] block of the list, for the visibility mask.

Mosaic's block rule (last two block dims multiples of (8, 128) or the full dims): q and o are [R, D] blocks with
R a multiple of 16 (bf16 packs 16 rows per sublane tile) and D whole; chunk is a multiple of 16 rows.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effarch.pallas_kernels.block_sparse.decode_layout import DecodeTiling, cost
from effarch.pallas_kernels.block_sparse.layout import dot_nt, finish, softmax_step
from effarch.pallas_kernels.interpret import Interpret
from effarch.pallas_kernels.vma import out_struct

ROWS = 16  # tile rows: a multiple of 16 fills whole bf16-packed sublane tiles


def row_tile(rows: int) -> int:
    return -(-rows // ROWS) * ROWS


def lane_tile(d: int) -> int:
    return d  # the caches are read as they are: no padded copy; q and o blocks take the whole head dim


def chunk_rows(granularity: str, block: int, chunk: int | None) -> int:
    """Cache rows per step: a listed block rounded up to a multiple of 16, or `chunk` (default 32) tokens."""
    return row_tile(block if granularity == "block" else (chunk or 32))


def heads_per_copy(n_kv_heads: int, dtype) -> int:
    """KV heads one DMA takes: HBM packs 32 bits of the head axis (the second-minor dim of [B, S, Hkv, D]) into one
    sublane, so a copy starts at a multiple of 32 / bits heads (2 for bf16, 1 for float32) and takes that many;
    the kernel keeps its own head's rows."""
    pack = min(n_kv_heads, max(1, 32 // (8 * jnp.dtype(dtype).itemsize)))
    return pack if n_kv_heads % pack == 0 else n_kv_heads


def _kernel(idx_ref, cnt_ref, len_ref, q_ref, ids_ref, k_hbm, v_hbm, o_ref, lse_ref, m_sc, l_sc, acc_sc, k_buf,
            v_buf, sem, *, t: DecodeTiling):
    # Program ids and scalars at the top level: the HLO interpreter does not substitute program_id inside pl.when.
    b, p, c = (pl.program_id(a) for a in range(3))
    row = b * t.n_groups + t.list_group(p)
    h = t.kv_head(p, jax.lax.div)
    n = jnp.clip(cnt_ref[row], 0, t.kmax)
    length = jnp.minimum(len_ref[b], t.s)
    offsets = jax.lax.broadcasted_iota(jnp.int32, (1, t.chunk), 1)
    pack = k_buf.shape[2] if k_buf.ndim == 4 else 1
    # The aligned head group holding h (pl.multiple_of: Mosaic checks the alignment of a DMA's start).
    heads = pl.ds(pl.multiple_of(h - jax.lax.rem(h, pack), pack), pack) if pack > 1 else h
    if t.granularity == "block":
        first = idx_ref[row * t.kmax + c] * t.block
        pos = jnp.clip(first, 0, t.s - t.chunk) + offsets
        ok = (pos >= first) & (pos < first + t.block) & (pos < length)
    else:
        ok = (c * t.chunk + offsets < n) & (ids_ref[...] >= 0) & (ids_ref[...] < length)
    steps = t.steps_of(n)
    slot = jax.lax.rem(c, 2)

    def copies(step, into):
        """The DMAs of loop step `step` (< steps) into buffer slot `into`: K and V rows of the head group."""
        if t.granularity == "block":
            start = jnp.clip(idx_ref[row * t.kmax + step] * t.block, 0, t.s - t.chunk)
            return [pltpu.make_async_copy(k_hbm.at[b, pl.ds(start, t.chunk), heads], k_buf.at[into], sem.at[into, 0]),
                    pltpu.make_async_copy(v_hbm.at[b, pl.ds(start, t.chunk), heads], v_buf.at[into], sem.at[into, 1])]
        out = []
        for i in range(t.chunk):
            j = jnp.clip(idx_ref[row * t.kmax + step * t.chunk + i], 0, t.s - 1)
            out += [pltpu.make_async_copy(k_hbm.at[b, pl.ds(j, 1), heads], k_buf.at[into, pl.ds(i, 1)],
                                          sem.at[into, 0]),
                    pltpu.make_async_copy(v_hbm.at[b, pl.ds(j, 1), heads], v_buf.at[into, pl.ds(i, 1)],
                                          sem.at[into, 1])]
        return out

    def head_of(buf):
        """[chunk, X] rows of head h from this step's buffer of the aligned head group."""
        if pack == 1:
            return buf[slot]
        rows = buf[slot, :, 0, :]
        for i in range(1, pack):
            rows = jnp.where(jax.lax.rem(h, pack) == i, buf[slot, :, i, :], rows)
        return rows

    @pl.when(c == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -1e30, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((c == 0) & (steps > 0))
    def _():
        for copy in copies(0, 0):
            copy.start()

    @pl.when(c + 1 < steps)
    def _():  # double buffering: the next step's rows are in flight during this step's wait and compute
        for copy in copies(c + 1, 1 - slot):
            copy.start()

    @pl.when(c < steps)
    def _():
        for copy in copies(c, slot):
            copy.wait()
        q = q_ref[...]
        v = head_of(v_buf)
        v = v.astype(jnp.promote_types(v.dtype, q.dtype))  # the xla path's rule, as on GPU
        s = dot_nt(q, head_of(k_buf).astype(q.dtype)) * t.scale
        m_sc[...], l_sc[...], acc_sc[...] = softmax_step(s, jnp.broadcast_to(ok, s.shape), m_sc[...], l_sc[...],
                                                         acc_sc[...], v, p_dtype=v.dtype)

    @pl.when(c == t.n_steps - 1)
    def _():
        o, lse = finish(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o
        lse_ref[...] = lse


def decode(t: DecodeTiling, q, k_cache, v_cache, idx, cnt, lengths, *, interpret: Interpret):
    """(o [B, Hp, R, Dv], lse [B, Hp, R, 1]), both float32.

    q [B, Hp, R, D]; k_cache [B, S, Hkv, D], v_cache [B, S, Hkv, Dv]; idx [B · Hs · kmax], cnt [B · Hs], lengths [B]
    (int32)."""
    B, Hp, R, D = q.shape
    Dv = v_cache.shape[-1]
    pack = heads_per_copy(k_cache.shape[2], k_cache.dtype)
    buf = (2, t.chunk, pack) if pack > 1 else (2, t.chunk)  # two slots: this step's rows and the next's
    ids = idx.reshape(-1, t.n_steps, 1, t.chunk) if t.granularity == "token" else jnp.zeros((1, 1, 1, 1), jnp.int32)

    def ids_index(b, p, c, *_):
        if t.granularity != "token":
            return 0, 0, 0, 0
        return b * t.n_groups + t.list_group(p), c, 0, 0

    return pl.pallas_call(
        functools.partial(_kernel, t=t),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, Hp, t.n_steps),
            in_specs=[pl.BlockSpec((None, None, R, D), lambda b, p, c, *_: (b, p, 0, 0)),
                      pl.BlockSpec((None, None) + ids.shape[2:], ids_index),
                      pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[pl.BlockSpec((None, None, R, Dv), lambda b, p, c, *_: (b, p, 0, 0)),
                       pl.BlockSpec((None, None, R, 1), lambda b, p, c, *_: (b, p, 0, 0))],
            scratch_shapes=[pltpu.VMEM((R, 1), jnp.float32), pltpu.VMEM((R, 1), jnp.float32),
                            pltpu.VMEM((R, Dv), jnp.float32), pltpu.VMEM((*buf, D), k_cache.dtype),
                            pltpu.VMEM((*buf, Dv), v_cache.dtype), pltpu.SemaphoreType.DMA((2, 2))],
        ),
        out_shape=[out_struct((B, Hp, R, Dv), jnp.float32, q), out_struct((B, Hp, R, 1), jnp.float32, q)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost(t, B, D, Dv, k_cache.dtype.itemsize),
        interpret=interpret,
        name="sparse_decode",
    )(idx, cnt, lengths, q, ids, k_cache, v_cache)
