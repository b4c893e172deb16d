"""Block-sparse softmax attention behind one `implementation=` switch (pallas_kernels/dispatch.py).

Implementations:
- "reference": reference.py, the dense masked softmax built from the lists (the oracle; O(Tq · Tk) memory).
- "xla": xla.py, gathers only the listed key blocks (O(Tq · Kmax · kv_block) memory at most, one step of query blocks
  at a time), FA2-style custom_vjp backward; tested against the reference (tests/pallas_kernels/block_sparse/).
- "pallas_tpu" / "pallas_gpu": the Mosaic and Triton kernels (pallas_tpu.py, pallas_gpu.py, wired in pallas_vjp.py),
  forward and backward; opt-in (never in DEFAULT_ORDER) until they have run on a device.

Default order: "xla" on every platform (pallas_kernels/dispatch.py: a Pallas kernel joins a platform's default only
once `scripts/gpu_check.sh` or its TPU counterpart has shown it correct and faster there).
"""

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse.pallas_vjp import block_sparse_pallas
from effarch.pallas_kernels.block_sparse.reference import block_sparse_reference, group_of_heads
from effarch.pallas_kernels.block_sparse.xla import block_sparse_xla
from effarch.pallas_kernels.dispatch import dispatch

OP = "block_sparse_attention"

DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}
IMPLEMENTATIONS = {"reference": block_sparse_reference, "xla": block_sparse_xla}
# The kernels: opt-in (not in DEFAULT_ORDER) until scripts/gpu_check.sh or a TPU run has shown them correct there.
IMPLEMENTATIONS["pallas_tpu"] = functools.partial(block_sparse_pallas, "pallas_tpu")
IMPLEMENTATIONS["pallas_gpu"] = functools.partial(block_sparse_pallas, "pallas_gpu")


def check_inputs(q, k, v, block_idx, block_cnt, *, q_block: int, kv_block: int, q_pos=None, kv_pos=None) -> None:
    """Raises ValueError naming the argument whose shape (or, for concrete lists, whose values) breaks the contract.

    Traced lists cannot be checked here: out-of-range ids are ignored by the reference and clamped by the kernels.
    """
    B, Tq, Hq, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Tk, Hkv, D={D}], got {k.shape}")
    Tk, Hkv = k.shape[1], k.shape[2]
    if v.ndim != 4 or v.shape[:3] != (B, Tk, Hkv):
        raise ValueError(f"v must be [B={B}, Tk={Tk}, Hkv={Hkv}, Dv], got {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if q_block < 1 or kv_block < 1:
        raise ValueError(f"q_block and kv_block must be positive, got {q_block} and {kv_block}")
    n_q_blocks, n_kv_blocks = -(-Tq // q_block), -(-Tk // kv_block)
    if block_idx.ndim != 4 or block_idx.shape[0] != B or block_idx.shape[2] != n_q_blocks:
        raise ValueError(f"block_idx must be [B={B}, Hs, nQb={n_q_blocks} (Tq={Tq} / q_block={q_block}), Kmax], "
                         f"got {block_idx.shape}")
    group_of_heads(Hq, Hkv, block_idx.shape[1])
    if block_cnt.shape != block_idx.shape[:3]:
        raise ValueError(f"block_cnt must be [B, Hs, nQb] = {block_idx.shape[:3]}, got {block_cnt.shape}")
    for name, pos, length in (("q_pos", q_pos, Tq), ("kv_pos", kv_pos, Tk)):
        if pos is not None and np.shape(pos)[-1:] != (length,):
            raise ValueError(f"{name} must be [B, {length}] or [{length}], got {np.shape(pos)}")
    if isinstance(block_idx, jax.core.Tracer) or isinstance(block_cnt, jax.core.Tracer):
        return
    idx, cnt = np.asarray(block_idx), np.asarray(block_cnt)
    kmax = idx.shape[-1]
    if cnt.min(initial=0) < 0 or cnt.max(initial=0) > kmax:
        raise ValueError(f"block_cnt must lie in [0, Kmax={kmax}], got values in [{cnt.min()}, {cnt.max()}]")
    used = np.arange(kmax) < cnt[..., None]
    bad = used & ((idx < 0) | (idx >= n_kv_blocks))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_idx{list(where)} = {idx[where]} is outside [0, nKb={n_kv_blocks}) "
                         f"(Tk={Tk} / kv_block={kv_block})")
    ids = np.where(used, idx, -1 - np.arange(kmax))  # unused slots never collide
    if (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        raise ValueError("block_idx lists a key block twice in one row; each listed block must be unique")


def block_sparse_attention(
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
    implementation: str | Sequence[str] | None = None,
):
    """Softmax attention of each query block over the key blocks its list names (README.md in this folder).

    Args:
      q: queries [B, Tq, Hq, D]; k: keys [B, Tk, Hkv, D]; v: values [B, Tk, Hkv, Dv]; Hq a multiple of Hkv.
      block_idx: int32 [B, Hs, nQb, Kmax], nQb = ceil(Tq / q_block): the key blocks (ids in [0, ceil(Tk / kv_block)))
        each query block attends to, any order, unique; Hs = 1 (all heads), Hkv (per GQA group) or Hq (per head).
      block_cnt: int32 [B, Hs, nQb]; entries c >= block_cnt of a list are ignored.
      q_block, kv_block: block sizes in tokens (need not be equal).
      causal: key position <= query position (positions, not array indices).
      window: None, an int or one int per list group: keys with q_pos - kv_pos < window stay visible.
      n_sink: with a window, keys at positions < n_sink (an int or one per group) stay visible too.
      q_pos, kv_pos: int32 [B, T] or [T] positions (default arange); negative marks padding (never visible).
      segment_ids: None, [B, T] (self-attention) or a (q_seg [B, Tq], kv_seg [B, Tk]) pair: keys of another
        segment are not visible.
      scale: logit scale, default 1 / sqrt(D).
      return_lse: also return the float32 log-sum-exp [B, Tq, Hq] (-inf on rows that see nothing), for
        `merge_attention`.
      implementation: a name, a sequence tried in order, or None for the platform default (module docstring).

    Returns:
      o [B, Tq, Hq, Dv] in q's dtype (0 on rows that see nothing), and lse when return_lse.
    """
    check_inputs(q, k, v, block_idx, block_cnt, q_block=q_block, kv_block=kv_block, q_pos=q_pos, kv_pos=kv_pos)
    return dispatch(OP, IMPLEMENTATIONS, implementation, q, k, v, block_idx, block_cnt, q_block=q_block,
                    kv_block=kv_block, causal=causal, window=window, n_sink=n_sink, q_pos=q_pos, kv_pos=kv_pos,
                    segment_ids=segment_ids, scale=scale, return_lse=return_lse, default_order=DEFAULT_ORDER)
