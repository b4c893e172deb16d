"""Ring-buffer KV cache of exactly `window` entries for sliding-window decoding.

The token at position p is written to slot p % window, so the cache always holds the last `window` positions:
exactly the keys the next query may see (reference.py convention t - window < j <= t). Slots not yet written
(fewer than `window` tokens seen) are masked. Attention is order-free over the slots, so decoding never reorders
them; prefill rolls them into time order to reuse the chunked kernel (xla.py) with the cache as its prefix.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.sliding_window.xla import sliding_window_chunked


class SlidingWindowCache(NamedTuple):
    """Decoding state of one sliding-window attention layer.

    Attributes:
      k: keys, [B, S, Hkv, K] with S = window; slot s holds the latest position p with p % window == s.
      v: values, [B, S, Hkv, V].
      pos: int32 scalar, tokens seen so far (= position of the next token), shared by the batch.
    """

    k: Float[Array, "B S Hkv K"]
    v: Float[Array, "B S Hkv V"]
    pos: Int[Array, ""]


def init_cache(
    batch_size: int, window: int, n_kv_heads: int, head_dim: int, value_dim: int | None = None, dtype=jnp.float32
) -> SlidingWindowCache:
    """An empty cache of `window` slots (zeros, pos = 0)."""
    value_dim = head_dim if value_dim is None else value_dim
    return SlidingWindowCache(
        k=jnp.zeros((batch_size, window, n_kv_heads, head_dim), dtype),
        v=jnp.zeros((batch_size, window, n_kv_heads, value_dim), dtype),
        pos=jnp.zeros((), jnp.int32),
    )


def decode_step(
    cache: SlidingWindowCache, q_t: Float[Array, "B H K"], k_t: Float[Array, "B Hkv K"], v_t: Float[Array, "B Hkv V"]
) -> tuple[SlidingWindowCache, Float[Array, "B H V"]]:
    """Writes token `cache.pos` into slot pos % window and attends to the written slots (itself included).

    Returns:
      (cache with pos + 1, o_t [B, H, V] in q_t's dtype).
    """
    b, h, kd = q_t.shape
    window, hkv = cache.k.shape[1], cache.k.shape[2]
    slot = cache.pos % window
    k = cache.k.at[:, slot].set(k_t.astype(cache.k.dtype))
    v = cache.v.at[:, slot].set(v_t.astype(cache.v.dtype))
    # Slot s has been written iff some position p <= pos has p % window == s.
    written = jnp.arange(window) <= cache.pos
    qg = q_t.astype(jnp.float32).reshape(b, hkv, h // hkv, kd)
    scores = jnp.einsum("BHGK,BSHK->BHGS", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(kd))
    scores = jnp.where(written[None, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("BHGS,BSHV->BHGV", probs, v.astype(jnp.float32)).reshape(b, h, v.shape[-1])
    return SlidingWindowCache(k, v, cache.pos + 1), o.astype(q_t.dtype)


def prefill(
    cache: SlidingWindowCache, q: Float[Array, "B T H K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv V"]
) -> tuple[SlidingWindowCache, Float[Array, "B T H V"]]:
    """Attends T new tokens (positions pos .. pos + T - 1) to the cache and each other; returns the updated cache.

    Equals T calls of `decode_step`, with the work of one chunked pass.
    """
    window, t = cache.k.shape[1], q.shape[1]
    # Time order: prefix[i] is position pos - window + i, stored in slot (pos + i) % window.
    prefix_k = jnp.roll(cache.k, -cache.pos, axis=1)
    prefix_v = jnp.roll(cache.v, -cache.pos, axis=1)
    o = sliding_window_chunked(
        q, k, v, window=window, prefix_k=prefix_k, prefix_v=prefix_v, prefix_len=jnp.minimum(cache.pos, window)
    )
    # The last `window` positions, pos + T - window + i for i < window, go to slot (pos + T - window + i) % window.
    last_k = jnp.concatenate([prefix_k, k.astype(cache.k.dtype)], axis=1)[:, -window:]
    last_v = jnp.concatenate([prefix_v, v.astype(cache.v.dtype)], axis=1)[:, -window:]
    shift = (cache.pos + t - window) % window
    cache = SlidingWindowCache(jnp.roll(last_k, shift, axis=1), jnp.roll(last_v, shift, axis=1), cache.pos + t)
    return cache, o
