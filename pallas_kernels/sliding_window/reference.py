"""Sliding-window causal softmax attention: the dense jnp oracle.

Paper: BASED, arXiv 2402.18668 §3.2 (SWA with a 64-token window); conventions: README.md.
Reference: HazyResearch/based@32c1bd4, based/models/mixers/slide_attention.py (`SlidingAttention`, flash-attn
`window=(W // 2, 0)`); HazyResearch/zoology@d88d6f5, zoology/mixers/attention.py (`SlidingAttn`).

Window convention of effarch: with window w, query t attends to the keys j with t - w < j <= t, i.e. exactly w keys
(fewer at the start of the sequence). This differs from based (window_size=W means W // 2 + 1 keys) and from
zoology (block_size=w means w + 1 keys); to reproduce either, pass the corresponding key count as `window`.

Grouped-query attention: q has H heads, k and v have Hkv heads with H = G * Hkv; query head h reads KV head h // G
(the reshape [H] -> [Hkv, G], as in jax.nn.dot_product_attention). In the einsums below the letter H stands for the
KV heads and G for the query heads of a group.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def window_mask(
    query_pos: Int[Array, " T"], key_pos: Int[Array, " S"], window: int
) -> Bool[Array, "T S"]:
    """True where key position j is visible from query position t: t - window < j <= t."""
    offset = query_pos[:, None] - key_pos[None, :]
    return (offset >= 0) & (offset < window)


def sliding_window_reference(
    q: Float[Array, "B T H K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv V"], *, window: int
) -> Float[Array, "B T H V"]:
    """Dense masked softmax attention with scale 1/sqrt(K); materialises [B, H, T, T], float32 inside.

    Args:
      q: queries, [B, T, H, K].
      k: keys, [B, T, Hkv, K]; H must be a multiple of Hkv.
      v: values, [B, T, Hkv, V].
      window: number of keys each query sees (itself and the window - 1 before it).

    Returns:
      [B, T, H, V] in q's dtype.
    """
    b, t, h, kd = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, h // hkv, kd)
    scores = jnp.einsum("BTHGK,BSHK->BHGTS", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(kd))
    pos = jnp.arange(t)
    mask = window_mask(pos, pos, window)
    scores = jnp.where(mask[None, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("BHGTS,BSHV->BTHGV", probs, v.astype(jnp.float32))
    return o.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
