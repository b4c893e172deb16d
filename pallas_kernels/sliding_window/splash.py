"""Sliding-window attention on TPU through jax's splash attention kernel with a `LocalMask`.

Paper: arXiv 2402.18668 §3.2 (BASED's SWA). Kernel: `jax.experimental.pallas.ops.tpu.splash_attention` (Mosaic TPU
flash attention over block-sparse masks, with its own Pallas backward in a `custom_vjp`).

Choices:
- Window: `LocalMask((T, T), window_size=(window - 1, 0), offset=0)` keeps q - (window - 1) <= j <= q, i.e.
  effarch's t - window < j <= t (reference.py). Blocks the mask leaves empty are skipped, so the work is
  O(T * (window + block)), not O(T^2).
- GQA: one `make_splash_mha` kernel on k/v with their Hkv heads as they are. Splash's MHA kernel already groups
  heads (its index maps read KV head h // (H / Hkv), the same layout as reference.py, and its dK/dV kernel sums
  over the G query heads of a group), so no `jnp.repeat` of K/V (G times the HBM traffic) and no loop of
  `make_splash_mqa` kernels, one per KV head (Hkv launches plus slicing and a concatenate). Hkv = 1 is the
  same call.
- Batch: `jax.vmap` over the kernel (a grid axis of the pallas_calls); splash works on [heads, T, head dim].
- Mesh: under a multi-device mesh the call runs per device block of batch and heads inside `jax.shard_map`
  (pallas_kernels/shard.py); Mosaic kernels cannot be partitioned by XLA.
- Scale: splash does not scale the logits, so q is multiplied by 1/sqrt(K) first (in q's dtype; exact for
  K = 64, a power of 4).
- Block sizes: splash needs block_kv (and its compute block) to be a multiple of 128 lanes and every block to
  divide T, so T must be a multiple of 128. The default picks one square block for every kernel, the largest of
  512, 256, 128 that divides T and is at most max(128, window): larger blocks waste work on masked keys when the
  window is short. Untuned: not yet measured on a TPU.
"""

import jax
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention
from jaxtyping import Array, Float

from effarch.pallas_kernels.dispatch import require_platform
from effarch.pallas_kernels.shard import BATCH, HEADS, shard_kernel

LANES = 128  # splash's NUM_LANES: block_kv and block_kv_compute must be multiples of it


def default_block_sizes(t: int, window: int) -> splash_attention.BlockSizes:
    """One block size b for the forward, dq and dkv kernels: the largest of 512, 256, 128 with T % b == 0 and
    b <= max(128, window). Assumes T % 128 == 0."""
    b = next(b for b in (512, 256, LANES) if t % b == 0 and b <= max(LANES, window))
    return splash_attention.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )


def sliding_window_splash(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T Hkv K"],
    v: Float[Array, "B T Hkv V"],
    *,
    window: int,
    block_sizes: splash_attention.BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> Float[Array, "B T H V"]:
    """Splash attention with a causal local mask of `window` keys, scale 1/sqrt(K); differentiable.

    Args:
      q: queries, [B, T, H, K]; T a multiple of 128.
      k: keys, [B, T, Hkv, K]; H a multiple of Hkv.
      v: values, [B, T, Hkv, V].
      window: keys per query: t - window < j <= t.
      block_sizes: splash tile sizes (forward and backward); default `default_block_sizes(T, window)`.
      interpret: None (the default): compiled Mosaic kernels, TPU devices required (the mesh's, else the default
        backend's: pallas_kernels/dispatch.py `current_platform`). True or a
        `pltpu.InterpretParams`: the Pallas kernels in interpret mode on any backend (tests on CPU). False:
        compiled Mosaic kernels without the backend check, for lowering to TPU from another host
        (`.lower(lowering_platforms=("tpu",))`).

    Returns:
      [B, T, H, V] in q's dtype.

    Raises:
      NotImplementedError: not on TPU with interpret=None, or T not a multiple of 128 (checked before any work).
    """
    if interpret is None:
        require_platform("sliding_window_attention", "pallas_tpu", "tpu")
    _, t, _, kd = q.shape
    if t % LANES:
        raise NotImplementedError(
            f"splash attention needs T to be a multiple of {LANES} (block_kv must be a multiple of {LANES} lanes "
            f"and divide T), got T={t}"
        )
    if block_sizes is None:
        block_sizes = default_block_sizes(t, window)
    mode = False if interpret is None else interpret

    def kernel(q, k, v):
        # Shapes here are per device block under a mesh (heads split over `tensor`): one mask per local head.
        heads = q.shape[2]
        # The same mask object for every head: splash's mask processing deduplicates equal head masks.
        local = splash_attention.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
        splash = splash_attention.make_splash_mha(
            splash_attention.MultiHeadMask([local] * heads),
            block_sizes=block_sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=mode,
        )
        q_scaled = q * np.asarray(1.0 / np.sqrt(kd), q.dtype)
        # Splash is per example and head-major: [H, T, K] -> vmap over B.
        o = jax.vmap(splash)(q_scaled.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
        return o.swapaxes(1, 2).astype(q.dtype)

    # Per device block of batch and (query and KV) heads under a multi-device mesh (pallas_kernels/shard.py); a
    # contiguous block of H / n query heads reads exactly its block of Hkv / n KV heads (h // G).
    x = (BATCH, None, HEADS, None)
    return shard_kernel(kernel, (x, x, x), x)(q, k, v)
