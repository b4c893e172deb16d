"""Softmax attention oracle (Vaswani et al., arXiv 1706.03762) with grouped KV heads (GQA, arXiv 2305.13245).

Plain jnp, O(T*S) memory: the readable truth the "xla" and "cudnn" paths of api.py are tested against.

Conventions (shared with `jax.nn.dot_product_attention`):
- head-minor layout, q [B, T, H, K], k [B, S, Hkv, K], v [B, S, Hkv, V];
- query head h reads KV head h // G with G = H // Hkv (query heads are grouped as [Hkv, G]);
- `causal` is top-left aligned: query i sits at absolute position q_offset + i and sees keys j <= q_offset + i;
- the softmax runs in float32, and a query row with no visible key returns 0 (not NaN, not the mean of v).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def attention_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hkv K"],
    v: Float[Array, "B S Hkv V"],
    *,
    causal: bool,
    scale: float | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    q_offset: int | Int[Array, ""] = 0,
) -> Float[Array, "B T H V"]:
    """softmax(scale * q kᵀ, masked) v, one softmax per (batch, query head, query).

    Args:
      q: queries, [B, T, H, K].
      k: keys, [B, S, Hkv, K]; H must be a multiple of Hkv (Hkv = H: MHA, 1: MQA, else GQA).
      v: values, [B, S, Hkv, V].
      causal: if True, query i sees key j only when j <= q_offset + i.
      scale: logit scale; None means 1 / sqrt(K).
      mask: optional boolean [B, T, S]; True marks a key the query may see. Combined with `causal` by AND.
      q_offset: absolute position of query 0 (prefill or decoding against a KV cache); only used when causal.

    Returns:
      [B, T, H, V] in q's dtype; rows with no visible key are 0.
    """
    B, T, H, K = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {Hkv}")
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale

    q_BTHGK = q.reshape(B, T, Hkv, G, K)
    logits_BHGTS = jnp.einsum("BTHGK,BSHK->BHGTS", q_BTHGK, k, preferred_element_type=jnp.float32) * scale

    visible_BTS = jnp.ones((B, T, S), dtype=bool) if mask is None else mask
    if causal:
        q_pos_T = q_offset + jnp.arange(T)
        visible_BTS = visible_BTS & (q_pos_T[:, None] >= jnp.arange(S)[None, :])[None]
    visible_B11TS = visible_BTS[:, None, None]

    # Safe softmax: masked logits are -inf, so exp gives exactly 0 with a zero gradient, and the max is taken over
    # visible keys only; a row with no visible key has max -inf, replaced by 0 so that the row sums to 0, not NaN.
    logits_BHGTS = jnp.where(visible_B11TS, logits_BHGTS, -jnp.inf)
    row_max = jnp.max(logits_BHGTS, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p_BHGTS = jnp.exp(logits_BHGTS - row_max)
    denom = jnp.sum(p_BHGTS, axis=-1, keepdims=True)
    probs_BHGTS = p_BHGTS / jnp.where(denom > 0, denom, 1.0)

    out_BTHGV = jnp.einsum("BHGTS,BSHV->BTHGV", probs_BHGTS, v.astype(jnp.float32))
    return out_BTHGV.reshape(B, T, H, v.shape[-1]).astype(q.dtype)
