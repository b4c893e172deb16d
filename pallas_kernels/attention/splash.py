"""Softmax attention on TPU through jax's splash attention kernel (Mosaic flash attention over block-sparse masks,
with its own Pallas backward in a `custom_vjp`): `attention_splash` (causal or full) and `splash_heads`, the call
that sliding_window/splash.py shares with it.

Choices (shared by every splash call here):
- GQA: one `make_splash_mha` kernel on k/v with their Hkv heads as they are. Splash's MHA kernel groups heads itself
  (its index maps read KV head h // (H / Hkv), the layout of reference.py, and its dK/dV kernel sums over the G query
  heads of a group), so K/V are neither repeated G times in HBM nor split into Hkv `make_splash_mqa` calls.
- Batch: `jax.vmap` over the kernel (a grid axis of the pallas_calls); splash works on [heads, T, head dim].
- Mesh: under a multi-device mesh the call runs per device block of batch and heads inside `jax.shard_map`
  (pallas_kernels/shard.py); Mosaic kernels cannot be partitioned by XLA.
- Scale: splash does not scale the logits, so q is multiplied by the scale first, in q's dtype.
- Block sizes: splash needs block_kv (and its compute block) to be a multiple of 128 lanes and every block to divide
  T, so T must be a multiple of 128. Untuned: no TPU has run these calls.

Opt-in for full attention (`implementation="pallas_tpu"`): dot_product_attention's TPU default stays "xla" until a
run on a TPU has checked this wrapper (pallas_kernels/dispatch.py's rule for kernels without evidence).
"""

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention
from jaxtyping import Array, Float

from effarch.pallas_kernels.dispatch import require_platform
from effarch.pallas_kernels.shard import BATCH, HEADS, shard_kernel

LANES = 128  # splash's NUM_LANES: block_kv and block_kv_compute must be multiples of it


def square_block_sizes(b: int) -> splash_attention.BlockSizes:
    """One square block size b for the forward, dq and dkv kernels."""
    return splash_attention.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                       block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def check_length(op: str, t: int) -> None:
    if t % LANES:
        raise NotImplementedError(f"{op}: splash attention needs T to be a multiple of {LANES} (block_kv must be a "
                                  f"multiple of {LANES} lanes and divide T), got T={t}")


def splash_heads(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T Hkv K"],
    v: Float[Array, "B T Hkv V"],
    *,
    head_mask: Callable[[], splash_attention.Mask],
    scale: float,
    block_sizes: splash_attention.BlockSizes,
    interpret: bool | pltpu.InterpretParams,
) -> Float[Array, "B T H V"]:
    """softmax(scale · q kᵀ under head_mask()) v with one splash MHA kernel per device block; differentiable."""

    def kernel(q, k, v):
        # Shapes here are per device block under a mesh (heads split over `tensor`): one mask per local head, the
        # same object for every head (splash's mask processing deduplicates equal head masks).
        mask = head_mask()
        splash = splash_attention.make_splash_mha(splash_attention.MultiHeadMask([mask] * q.shape[2]),
                                                  block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                                  interpret=interpret)
        q_scaled = q * np.asarray(scale, q.dtype)
        # Splash is per example and head-major: [H, T, K] -> vmap over B.
        o = jax.vmap(splash)(q_scaled.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
        return o.swapaxes(1, 2).astype(q.dtype)

    # A contiguous block of H / n query heads reads exactly its block of Hkv / n KV heads (h // G).
    x = (BATCH, None, HEADS, None)
    return shard_kernel(kernel, (x, x, x), x)(q, k, v)


def attention_splash(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T Hkv K"],
    v: Float[Array, "B T Hkv V"],
    *,
    causal: bool,
    scale: float | None = None,
    mask=None,
    block_sizes: splash_attention.BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> Float[Array, "B T H V"]:
    """Causal (`CausalMask`: key j <= query i) or full softmax attention with splash; K == V head dims.

    Args:
      q, k, v: [B, T, H, K], [B, T, Hkv, K], [B, T, Hkv, K]; T a multiple of 128, self-attention (S = T).
      causal, scale: as dot_product_attention (scale None: 1 / sqrt(K)).
      mask: must be None (splash masks are static; a [B, T, S] array mask is the "xla" path's).
      block_sizes: default: the largest of 512, 256, 128 dividing T, for every kernel.
      interpret: None: compiled Mosaic kernels, TPU devices required (the mesh's, else the default backend's). True
        or `pltpu.InterpretParams`: interpret mode on any backend (tests). False: compiled without the platform
        check, for lowering to TPU from another host.

    Raises:
      NotImplementedError (before any work): not on TPU with interpret=None, T % 128, an array mask, S != T or
        K != V.
    """
    op = "dot_product_attention"
    if interpret is None:
        require_platform(op, "pallas_tpu", "tpu")
    t, kd = q.shape[1], q.shape[3]
    if mask is not None:
        raise NotImplementedError(f"{op}: 'pallas_tpu' takes no array mask (splash masks are static)")
    if k.shape[1] != t or v.shape[-1] != kd:
        raise NotImplementedError(f"{op}: 'pallas_tpu' needs S == T and K == V, got q {q.shape}, k {k.shape}, "
                                  f"v {v.shape}")
    check_length(op, t)
    if block_sizes is None:
        block_sizes = square_block_sizes(next(b for b in (512, 256, LANES) if t % b == 0))
    make = (lambda: splash_attention.CausalMask((t, t))) if causal else (lambda: splash_attention.FullMask((t, t)))
    return splash_heads(q, k, v, head_mask=make, scale=kd**-0.5 if scale is None else scale,
                        block_sizes=block_sizes, interpret=False if interpret is None else interpret)
