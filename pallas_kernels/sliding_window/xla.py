"""Sliding-window causal softmax attention, chunked in plain XLA: O(T * window) time and memory.

Paper: arXiv 2402.18668 §3.2. Convention and GQA layout as in reference.py (query t sees keys t - window < j <= t;
in the einsums H stands for the KV heads and G for the query heads of a group).

The sequence is cut into chunks of C = window tokens. The keys visible from chunk n lie in chunks n - 1 and n, so
each query chunk attends to a [C, 2C] block, masked. Chunk 0's "previous chunk" is either zeros (masked) or a
`prefix` of window keys before the sequence (the decoding cache, in time order), which makes the same code serve
prefill after earlier tokens.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.sliding_window.reference import window_mask


def sliding_window_chunked(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T Hkv K"],
    v: Float[Array, "B T Hkv V"],
    *,
    window: int,
    prefix_k: Float[Array, "B C Hkv K"] | None = None,
    prefix_v: Float[Array, "B C Hkv V"] | None = None,
    prefix_len: int | Int[Array, ""] = 0,
) -> Float[Array, "B T H V"]:
    """Causal sliding-window attention over [C, 2C] blocks, C = window.

    Args:
      q: queries, [B, T, H, K]. T need not be a multiple of window (the tail is padded and dropped).
      k: keys, [B, T, Hkv, K].
      v: values, [B, T, Hkv, V].
      window: keys per query.
      prefix_k: keys of the `window` positions just before q[:, 0], in time order, [B, window, Hkv, K].
      prefix_v: their values, [B, window, Hkv, V].
      prefix_len: how many of the prefix positions exist (the last `prefix_len` are real; may be traced).

    Returns:
      [B, T, H, V] in q's dtype.
    """
    b, t, h, kd = q.shape
    hkv, vd = k.shape[2], v.shape[-1]
    c = window
    n = -(-t // c)
    pad = ((0, 0), (0, n * c - t), (0, 0), (0, 0))
    qc = jnp.pad(q.astype(jnp.float32), pad).reshape(b, n, c, hkv, h // hkv, kd)
    kc = jnp.pad(k.astype(jnp.float32), pad).reshape(b, n, c, hkv, kd)
    vc = jnp.pad(v.astype(jnp.float32), pad).reshape(b, n, c, hkv, vd)
    if prefix_k is None or prefix_v is None:
        prefix_k = jnp.zeros((b, c, hkv, kd), jnp.float32)
        prefix_v = jnp.zeros((b, c, hkv, vd), jnp.float32)
        prefix_len = 0
    # Keys of chunk n's block: chunk n - 1 then chunk n, [B, N, 2C, Hkv, *].
    keys = jnp.concatenate([jnp.concatenate([prefix_k[:, None].astype(jnp.float32), kc[:, :-1]], axis=1), kc], axis=2)
    values = jnp.concatenate([jnp.concatenate([prefix_v[:, None].astype(jnp.float32), vc[:, :-1]], axis=1), vc], axis=2)

    scores = jnp.einsum("BNTHGK,BNSHK->BNHGTS", qc, keys) / jnp.sqrt(jnp.float32(kd))
    # Positions relative to q[:, 0]: query i of chunk n is at nC + i, key j of its block at nC + j - C.
    in_window = window_mask(jnp.arange(c), jnp.arange(2 * c) - c, window)
    key_pos = (jnp.arange(n) * c)[:, None] + (jnp.arange(2 * c) - c)[None, :]
    mask = in_window[None, :, :] & (key_pos >= -prefix_len)[:, None, :]
    scores = jnp.where(mask[None, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("BNHGTS,BNSHV->BNTHGV", probs, values)
    return o.reshape(b, n * c, h, vd)[:, :t].astype(q.dtype)
