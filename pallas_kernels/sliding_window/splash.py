"""Sliding-window attention on TPU through jax's splash attention kernel with a `LocalMask`.

Paper: arXiv 2402.18668 §3.2 (BASED's SWA). Kernel: `jax.experimental.pallas.ops.tpu.splash_attention` (Mosaic TPU
flash attention over block-sparse masks, with its own Pallas backward in a `custom_vjp`).

Choices (GQA without repeating K/V, vmap over the batch, shard_map under a mesh, the scale applied to q,
block sizes multiples of 128 lanes so T % 128 == 0): pallas_kernels/attention/splash.py, whose `splash_heads` this
calls with the mask below.
- Window: `LocalMask((T, T), window_size=(window - 1, 0), offset=0)` keeps q - (window - 1) <= j <= q, i.e.
  effarch's t - window < j <= t (reference.py). Blocks the mask leaves empty are skipped, so the work is
  O(T * (window + block)), not O(T^2).
- Block sizes: one square block for every kernel, the largest of 512, 256, 128 that divides T and is at most
  max(128, window): larger blocks waste work on masked keys when the window is short. Untuned: not yet measured on
  a TPU.
"""

from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention
from jaxtyping import Array, Float

from effarch.pallas_kernels.attention.splash import LANES, check_length, splash_heads, square_block_sizes
from effarch.pallas_kernels.dispatch import require_platform


def default_block_sizes(t: int, window: int) -> splash_attention.BlockSizes:
    """One block size b for the forward, dq and dkv kernels: the largest of 512, 256, 128 with T % b == 0 and
    b <= max(128, window). Assumes T % 128 == 0."""
    b = next(b for b in (512, 256, LANES) if t % b == 0 and b <= max(LANES, window))
    return square_block_sizes(b)


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
    check_length("sliding_window_attention", t)
    if block_sizes is None:
        block_sizes = default_block_sizes(t, window)
    return splash_heads(q, k, v, head_mask=lambda: splash_attention.LocalMask((t, t), window_size=(window - 1, 0),
                                                                               offset=0),
                        scale=kd**-0.5, block_sizes=block_sizes, interpret=False if interpret is None else interpret)
