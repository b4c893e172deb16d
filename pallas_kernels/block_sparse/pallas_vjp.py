"""The "pallas_tpu" and "pallas_gpu" implementations of `block_sparse_attention`: the kernels of pallas_tpu.py and
pallas_gpu.py under one `jax.custom_vjp`, the tiled layout around them (layout.py), and `shard_kernel` over the
batch and head axes.

The custom_vjp is taken over the kernel layout (padded blocks, head-major, padded head dims), so padding and
unpadding stay ordinary differentiable jnp around it. The forward saves q, k, v, o and the float32 lse; the backward
computes delta = rowsum(o ⊙ dO) − dlse in jnp (dlse: the lse output's cotangent, so `return_lse=True` callers such
as `merge_attention` get exact gradients: ∂lse_i/∂s_ij = p_ij), builds the transposed lists (transpose.py) and runs
the dQ and dK/dV kernels. Lists, positions, segments, windows and sinks carry no gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse import layout, pallas_tpu
from effarch.pallas_kernels.block_sparse.transpose import key_major_pairs
from effarch.pallas_kernels.interpret import Interpret, resolve_interpret
from effarch.pallas_kernels.shard import BATCH, HEADS, shard_kernel

OP = "block_sparse_attention"
_PLATFORMS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def _kernels(name: str):
    if name == "pallas_tpu":
        return pallas_tpu
    from effarch.pallas_kernels.block_sparse import pallas_gpu

    return pallas_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attend(name, t, interpret, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink):
    return _kernels(name).forward(t, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink, interpret=interpret)


def _attend_fwd(name, t, interpret, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink):
    o, lse = _attend(name, t, interpret, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink)
    return (o, lse), (qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink, o, lse)


def _attend_bwd(name, t, interpret, residuals, cotangents):
    qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, window, sink, o, lse = residuals
    d_o, d_lse = cotangents
    delta = jnp.sum(o.astype(jnp.float32) * d_o.astype(jnp.float32), axis=-1, keepdims=True) - d_lse
    B = qk.shape[0]
    transposed = key_major_pairs(idx.reshape(B, t.n_groups, t.n_q_blocks, t.kmax),
                                 cnt.reshape(B, t.n_groups, t.n_q_blocks), t.n_kv_blocks)
    dq, dk, dv = _kernels(name).backward(t, qk, kk, vk, qpos, kpos, qseg, kseg, idx, cnt, transposed, window, sink,
                                         d_o.astype(qk.dtype), lse, delta, interpret=interpret)
    n_kv = kk.shape[1]
    if dk.shape[1] != n_kv:  # per-query-head programs: sum over each GQA group
        dk = dk.reshape(B, n_kv, -1, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, n_kv, -1, *dv.shape[2:]).sum(2)
    return (dq, dk.astype(kk.dtype), dv.astype(vk.dtype)) + (None,) * 8


_attend.defvjp(_attend_fwd, _attend_bwd)


def _density(block_idx, block_cnt) -> float:
    """Used list slots / all slots for concrete lists, 1 (every slot) for traced ones (cost.py)."""
    if isinstance(block_cnt, jax.core.Tracer) or block_idx.shape[-1] == 0:
        return 1.0
    return float(np.minimum(np.asarray(block_cnt), block_idx.shape[-1]).sum()) / max(1, np.prod(block_idx.shape))


def _run(name, interpret, static, q, k, v, idx, cnt, q_pos, kv_pos, q_seg, kv_seg, window, sink):
    """The kernel on one device block: layout in, custom_vjp'd kernels, layout out."""
    kernels = _kernels(name)
    q_block, kv_block = static["q_block"], static["kv_block"]
    B, Tq, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    Hs = idx.shape[1]
    bq, bk = kernels.row_tile(q_block), kernels.row_tile(kv_block)
    dp, dvp = kernels.lane_tile(D), kernels.lane_tile(Dv)
    gq = kernels.heads_per_program(Hs, Hq, Hkv)
    t = layout.tiling(q.shape, k.shape, v.shape, idx.shape, q_block=q_block, kv_block=kv_block, bq=bq, bk=bk, gq=gq,
                      density=static["density"], scale=static["scale"],
                      causal=static["causal"], has_window=static["has_window"], has_segments=static["has_segments"])
    nq, nk = t.n_q_blocks, t.n_kv_blocks

    def heads_first(x, block, tile, n, width):
        x = layout.pad_last(layout.blocked(x, block, tile, n), width)
        return x.transpose(0, 2, 1, 3)

    qk = heads_first(q, q_block, bq, nq, dp).reshape(B, Hq // gq, gq, nq * bq, dp)
    kk, vk = heads_first(k, kv_block, bk, nk, dp), heads_first(v, kv_block, bk, nk, dvp)
    qpos = layout.blocked(q_pos, q_block, bq, nq, fill=-1)[..., None]
    kpos = layout.blocked(kv_pos, kv_block, bk, nk, fill=-1).reshape(B, nk, 1, bk)
    qseg = layout.blocked(q_seg, q_block, bq, nq)[..., None]
    kseg = layout.blocked(kv_seg, kv_block, bk, nk).reshape(B, nk, 1, bk)
    if idx.shape[-1] == 0:  # Kmax = 0: one ignored slot, so the grid has a step to write the (empty) rows
        idx = jnp.full((*idx.shape[:3], 1), -1, jnp.int32)
    o, lse = _attend(name, t, interpret, qk, kk, vk, qpos, kpos, qseg, kseg, idx.reshape(-1), cnt.reshape(-1),
                     window, sink)
    o = o.reshape(B, Hq, nq * bq, dvp).transpose(0, 2, 1, 3)[..., :Dv]
    lse = lse.reshape(B, Hq, nq * bq).transpose(0, 2, 1)
    return layout.unblocked(o, q_block, bq, nq, Tq), layout.unblocked(lse, q_block, bq, nq, Tq)


def block_sparse_pallas(
    name: str,
    q: Float[Array, "B Tq Hq D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv Dv"],
    block_idx: Int[Array, "B Hs nQb Kmax"],
    block_cnt: Int[Array, "B Hs nQb"],
    *,
    q_block: int,
    kv_block: int,
    causal: bool = True,
    window=None,
    n_sink=None,
    q_pos=None,
    kv_pos=None,
    segment_ids=None,
    scale: float | None = None,
    return_lse: bool = False,
    interpret: Interpret | None = None,
):
    """`block_sparse_attention` (api.py, same arguments) on kernel `name` ("pallas_tpu" or "pallas_gpu").

    Checks the platform first (NotImplementedError before any work off it, so dispatch can fall back), then runs the
    kernels per device block of batch and heads under a multi-device mesh (pallas_kernels/shard.py).
    interpret: None follows EFFARCH_PALLAS_INTERPRET and otherwise needs the kernel's platform
    (pallas_kernels/interpret.py); True / InterpretParams interpret; False compiles without a platform check.
    """
    interpret = resolve_interpret(OP, name, _PLATFORMS[name], interpret)
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    Hs = block_idx.shape[1]
    static = dict(q_block=q_block, kv_block=kv_block, scale=scale, causal=causal, has_window=window is not None,
                  has_segments=segment_ids is not None, density=_density(block_idx, block_cnt))
    if segment_ids is None:
        q_seg, kv_seg = jnp.zeros((B, Tq), jnp.int32), jnp.zeros((B, Tk), jnp.int32)
    else:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        q_seg, kv_seg = (jnp.broadcast_to(jnp.asarray(s, jnp.int32), (B, n)) for s, n in ((q_seg, Tq), (kv_seg, Tk)))
    args = (q, k, v, jnp.asarray(block_idx, jnp.int32), jnp.asarray(block_cnt, jnp.int32),
            layout.positions(q_pos, B, Tq), layout.positions(kv_pos, B, Tk), q_seg, kv_seg,
            layout.per_group(window, Hs, layout.WINDOW_NONE), layout.per_group(n_sink, Hs, 0))

    x = (BATCH, None, HEADS, None)
    g = HEADS if Hs > 1 else None  # one list for all heads is not split with them
    row = (BATCH, None)
    in_axes = (x, x, x, (BATCH, g, None, None), (BATCH, g, None), row, row, row, row, (g,), (g,))
    run = functools.partial(_run, name, interpret, static)
    o, lse = shard_kernel(run, in_axes, (x, (BATCH, None, HEADS)))(*args)
    return (o, lse) if return_lse else o
