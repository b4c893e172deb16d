"""Public entry points of sliding-window causal softmax attention (BASED's SWA, arXiv 2402.18668 §3.2).

Convention: query t attends to keys t - window < j <= t, exactly `window` keys (reference.py). GQA: q has H heads,
k and v have Hkv heads, H a multiple of Hkv.

- `sliding_window_attention`: the parallel form; `implementation=` in {"reference", "xla", "cudnn", "pallas_tpu"}.
  Default order: cpu ("xla",), gpu ("cudnn", "xla"), tpu ("pallas_tpu", "xla"). "cudnn" raises NotImplementedError
  off GPU and for float32 inputs (cuDNN flash attention takes bf16 / fp16), so a float32 call on GPU falls back to
  "xla" with a warning under the default order. "pallas_tpu" (splash attention with a LocalMask, splash.py) raises
  NotImplementedError off TPU and when T is not a multiple of 128, so such a call on TPU falls back to "xla".
- `sliding_window_init_cache` / `sliding_window_decode_step` / `sliding_window_prefill`: decoding with a ring buffer
  of `window` entries (cache.py). Prefill always uses the chunked XLA path.
"""

from collections.abc import Mapping, Sequence

from jaxtyping import Array, Float

from effarch.pallas_kernels.dispatch import dispatch
from effarch.pallas_kernels.sliding_window import cache as cache_lib
from effarch.pallas_kernels.sliding_window.cache import SlidingWindowCache
from effarch.pallas_kernels.sliding_window.cudnn import sliding_window_cudnn
from effarch.pallas_kernels.sliding_window.reference import sliding_window_reference
from effarch.pallas_kernels.sliding_window.splash import sliding_window_splash
from effarch.pallas_kernels.sliding_window.xla import sliding_window_chunked

DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = {
    "cpu": ("xla",),
    "gpu": ("cudnn", "xla"),
    "tpu": ("pallas_tpu", "xla"),
}

_IMPLS = {
    "reference": sliding_window_reference,
    "xla": sliding_window_chunked,
    "cudnn": sliding_window_cudnn,
    "pallas_tpu": sliding_window_splash,
}


def _check_shapes(q, k, v, window: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def sliding_window_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T Hkv K"],
    v: Float[Array, "B T Hkv V"],
    *,
    window: int,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T H V"]:
    """Causal softmax attention restricted to the last `window` keys, scale 1/sqrt(K).

    Args:
      q: queries, [B, T, H, K] (RoPE already applied by the caller).
      k: keys, [B, T, Hkv, K].
      v: values, [B, T, Hkv, V].
      window: keys per query: t - window < j <= t.
      implementation: "reference" (dense [T, T]), "xla" (chunked, O(T * window)), "cudnn" (GPU, bf16/fp16),
        "pallas_tpu" (TPU splash attention, T a multiple of 128), a sequence of these tried in order, or None for
        the platform default.

    Returns:
      [B, T, H, V] in q's dtype.
    """
    _check_shapes(q, k, v, window)
    return dispatch(
        "sliding_window_attention", _IMPLS, implementation, q, k, v, window=window, default_order=DEFAULT_ORDER
    )


def sliding_window_init_cache(
    batch_size: int, window: int, n_kv_heads: int, head_dim: int, value_dim: int | None = None, dtype=None
) -> SlidingWindowCache:
    """Empty ring buffer: k [B, window, Hkv, K], v [B, window, Hkv, V] zeros and pos = 0 (float32 by default)."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    return cache_lib.init_cache(batch_size, window, n_kv_heads, head_dim, value_dim, **kwargs)


def sliding_window_decode_step(
    cache: SlidingWindowCache, q_t: Float[Array, "B H K"], k_t: Float[Array, "B Hkv K"], v_t: Float[Array, "B Hkv V"]
) -> tuple[SlidingWindowCache, Float[Array, "B H V"]]:
    """One token at position cache.pos: returns (cache with the token written, o_t [B, H, V])."""
    return cache_lib.decode_step(cache, q_t, k_t, v_t)


def sliding_window_prefill(
    cache: SlidingWindowCache, q: Float[Array, "B T H K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv V"]
) -> tuple[SlidingWindowCache, Float[Array, "B T H V"]]:
    """T tokens after the cached ones in one chunked pass: returns (updated cache, o [B, T, H, V])."""
    _check_shapes(q, k, v, cache.k.shape[1])
    return cache_lib.prefill(cache, q, k, v)
