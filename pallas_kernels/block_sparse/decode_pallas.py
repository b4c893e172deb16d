"""The "pallas_gpu" and "pallas_tpu" implementations of `sparse_decode_attention` (decode.py): the kernels of
decode_pallas_gpu.py and decode_pallas_tpu.py, the layout around them (decode_layout.py), the merge of the GPU's
split-k partials, and `shard_kernel` over the batch and head axes.

Layout: q [B, Hq, D] is viewed as [B, Hp, R, D] (program heads × rows, decode_layout.py) and padded to the backend's
row tile (zero rows, dropped after); the lists are flattened to int32 [B · Hs · kmax] (token lists padded with −1 to
whole chunks). The caches go to the kernels as they are, [B, S, Hkv, D], so a step reads O(K) of them; they are
copied only where a backend needs it: a cache shorter than one chunk (padded to it), and on GPU a head dim that is
not a power of 2 ≥ 16 (zero-padded).

Forward only: a decode step has no backward here (the "xla" path is differentiable; these kernels are not).
"""

import functools

import jax.numpy as jnp

from effarch.pallas_kernels.block_sparse.decode_layout import DecodeTiling
from effarch.pallas_kernels.interpret import Interpret, resolve_interpret
from effarch.pallas_kernels.shard import BATCH, HEADS, shard_kernel

OP = "sparse_decode_attention"
_PLATFORMS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
# GPU split-k: enough programs to fill an H100's 132 SMs about twice, never more splits than steps.
TARGET_PROGRAMS = 256
MAX_SPLITS = 32


def _kernels(name: str):
    if name == "pallas_tpu":
        from effarch.pallas_kernels.block_sparse import decode_pallas_tpu

        return decode_pallas_tpu
    from effarch.pallas_kernels.block_sparse import decode_pallas_gpu

    return decode_pallas_gpu


def _splits(name: str, batch: int, programs: int, n_steps: int, splits: int | None) -> int:
    if name == "pallas_tpu":  # the TPU grid is a loop on one core: a list's steps stay in one program
        return 1
    if splits is not None:
        return max(1, min(int(splits), n_steps))
    return max(1, min(n_steps, MAX_SPLITS, TARGET_PROGRAMS // max(1, batch * programs)))


def merge_splits(o, lse):
    """o [B, Hp, splits, R, Dv] and lse [.., 1] partials (disjoint parts of one list) -> o [B, Hp, R, Dv] and lse
    [B, Hp, R] (float32), the double-where rule: a row no split saw stays o = 0, lse = −inf."""
    if o.shape[2] == 1:
        return o[:, :, 0], lse[:, :, 0, :, 0]
    m = jnp.max(lse, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # 0 for a split that saw nothing
    total = jnp.sum(w, axis=2)
    seen = total > 0
    o = jnp.sum(w * o, axis=2) / jnp.where(seen, total, 1.0)
    return o, jnp.where(seen, m[:, :, 0] + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)[..., 0]


def _pad_to(x, axis: int, size: int, fill=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill)


def _run(name, interpret, static, q, k_cache, v_cache, idx, cnt, lengths):
    """The kernel on one device block: layout in, kernel, split merge, layout out."""
    kernels = _kernels(name)
    granularity, block, chunk = static["granularity"], static["block"], static["chunk"]
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1:3]
    Dv = v_cache.shape[-1]
    Hs, K = idx.shape[1:]
    G = Hq // Hkv
    per_head = Hs == Hq and G > 1
    Hp, R = (Hq, 1) if per_head else (Hkv, G)
    rows = kernels.row_tile(R)
    rows_of_chunk = kernels.chunk_rows(granularity, block, chunk)
    n_steps = max(1, K if granularity == "block" else -(-K // rows_of_chunk))
    kmax = max(1, K) if granularity == "block" else n_steps * rows_of_chunk
    idx = _pad_to(idx, 2, kmax, fill=-1)  # K = 0: one ignored slot, so a step exists to write the empty rows
    dp, dvp = kernels.lane_tile(D), kernels.lane_tile(Dv)
    s_len = max(S, rows_of_chunk)  # the chunk read stays inside the cache
    k_cache = _pad_to(_pad_to(k_cache, 1, s_len), 3, dp)
    v_cache = _pad_to(_pad_to(v_cache, 1, s_len), 3, dvp)
    t = DecodeTiling(granularity=granularity, block=block, chunk=rows_of_chunk, n_steps=n_steps, kmax=kmax, s=s_len,
                     n_groups=Hs, n_programs=Hp, kv_group=G, per_head=per_head, rows=rows,
                     scale=D**-0.5 if static["scale"] is None else float(static["scale"]),
                     splits=_splits(name, B, Hp, n_steps, static["splits"]))
    qk = _pad_to(_pad_to(q.reshape(B, Hp, R, D), 2, rows), 3, dp)
    o, lse = kernels.decode(t, qk, k_cache, v_cache, idx.reshape(-1), cnt.reshape(-1), lengths, interpret=interpret)
    o, lse = merge_splits(o, lse) if o.ndim == 5 else (o, lse[..., 0])
    o = o[:, :, :R, :Dv].reshape(B, Hq, Dv).astype(q.dtype)
    return o, lse[:, :, :R].reshape(B, Hq)


def sparse_decode_pallas(name: str, q, k_cache, v_cache, idx, cnt, *, granularity="token", block=None, lengths=None,
                         scale=None, return_lse=True, key_shift=None, rope_freqs=None, chunk: int | None = None,
                         splits: int | None = None, interpret: Interpret | None = None):
    """`sparse_decode_attention` (decode.py, same arguments, inputs already checked) on kernel `name`. key_shift
    (longheads' re-positioned keys) is not in the kernels: NotImplementedError.

    chunk: list slots per step for granularity "token" (default 32; rounded to the backend's tile); splits (GPU):
    programs per list (default: enough to fill the GPU, at most 32). interpret: None follows EFFARCH_PALLAS_INTERPRET
    and otherwise needs the kernel's platform (NotImplementedError before any work, so dispatch can fall back); True
    or InterpretParams interpret; False compiles without a platform check (cross-lowering from a CPU host).
    """
    if key_shift is not None:  # before any work, so that dispatch can fall back to the xla path
        raise NotImplementedError(f"{OP}: {name} does not re-rotate keys (key_shift); use implementation='xla'")
    del rope_freqs
    interpret = resolve_interpret(OP, name, _PLATFORMS[name], interpret)
    B, S = k_cache.shape[:2]
    Hs = idx.shape[1]
    # Clipped to S: a cache shorter than one chunk is padded (_run), and its padded rows must stay invisible.
    lengths = jnp.full((B,), S, jnp.int32) if lengths is None else jnp.minimum(jnp.asarray(lengths, jnp.int32), S)
    static = dict(granularity=granularity, block=1 if granularity == "token" else int(block), chunk=chunk,
                  scale=scale, splits=splits)
    g = HEADS if Hs > 1 else None  # one list for all heads is not split with them
    in_axes = ((BATCH, HEADS, None), (BATCH, None, HEADS, None), (BATCH, None, HEADS, None), (BATCH, g, None),
               (BATCH, g), (BATCH,))
    run = functools.partial(_run, name, interpret, static)
    o, lse = shard_kernel(run, in_axes, ((BATCH, HEADS, None), (BATCH, HEADS)))(
        q, k_cache, v_cache, jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32), lengths)
    return (o, lse) if return_lse else o
