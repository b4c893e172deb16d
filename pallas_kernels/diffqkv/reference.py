"""DiffQKV attention oracle (Sigma, arXiv 2501.13629 §2): independent query, key and value head counts.

Plain jnp, O(T*S) memory and K / V heads gathered per query head: the readable truth that xla.py is tested against.

Conventions (Sigma, arXiv 2501.13629 §2; FlexHeadFA eq. 3; README.md):
- head-minor layout, q [B, T, Hq, K], k [B, S, Hk, K], v [B, S, Hv, V];
- query head i reads K head floor(i * Hk / Hq) and V head floor(i * Hv / Hq), written here literally (any counts);
- logits are scaled by 1/sqrt(K) unless `scale` says otherwise; the softmax runs in float32;
- `causal` is top-left aligned: query i sits at absolute position q_offset + i and sees keys j <= q_offset + i;
  a query row with no visible key returns 0.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def head_index(n_q: int, n: int) -> Int[Array, " H"]:
    """floor(i * n / n_q) for each query head i < n_q: which of n K (or V) heads query head i reads."""
    return (jnp.arange(n_q) * n) // n_q


def masked_logits(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    *,
    causal: bool,
    scale: float | None,
    q_offset: int | Int[Array, ""],
) -> Float[Array, "B H T S"]:
    """scale * q . k per query head in float32, -inf where a key is hidden (causal mask with q_offset)."""
    T, H, K = q.shape[1:]
    S = k.shape[1]
    scale = K**-0.5 if scale is None else scale
    k_BSHK = k[:, :, head_index(H, k.shape[2])]
    logits_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q, k_BSHK, preferred_element_type=jnp.float32) * scale
    if causal:
        visible_TS = (q_offset + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
        logits_BHTS = jnp.where(visible_TS[None, None], logits_BHTS, -jnp.inf)
    return logits_BHTS


def safe_softmax(logits: Float[Array, "*B S"]) -> Float[Array, "*B S"]:
    """softmax over the last axis where a row of -inf gives zeros (not NaN) with a zero gradient."""
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def diffqkv_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    v: Float[Array, "B S Hv V"],
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | Int[Array, ""] = 0,
) -> Float[Array, "B T H V"]:
    """softmax(scale * q_i K_{hk(i)}ᵀ) V_{hv(i)} for every query head i, with hk(i), hv(i) from `head_index`.

    Args:
      q: queries, [B, T, Hq, K].
      k: keys, [B, S, Hk, K]; any Hk <= Hq.
      v: values, [B, S, Hv, V]; any Hv <= Hq.
      causal: if True, query i sees key j only when j <= q_offset + i.
      scale: logit scale; None means 1 / sqrt(K).
      q_offset: absolute position of query 0 (decoding against a KV cache); only used when causal.

    Returns:
      [B, T, Hq, V] in q's dtype.
    """
    H = q.shape[2]
    probs_BHTS = safe_softmax(masked_logits(q, k, causal=causal, scale=scale, q_offset=q_offset))
    v_BSHV = v[:, :, head_index(H, v.shape[2])].astype(jnp.float32)
    return jnp.einsum("BHTS,BSHV->BTHV", probs_BHTS, v_BSHV).astype(q.dtype)


def selective_v_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    v: Float[Array, "B S Hv V"],
    *,
    top_n: int,
    renormalize: bool = False,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | Int[Array, ""] = 0,
) -> Float[Array, "B T H V"]:
    """Selective V cache fetching (paper App. B.2): o = sum over the top-N keys j of alpha_j V_j.

    alpha is the full softmax over every visible key (K is small, so all of it is read); only the V rows of the
    `top_n` largest alpha per (query, head) are gathered. As in the paper, alpha is not renormalised over the
    selected keys unless `renormalize`. With top_n >= S this is exactly `diffqkv_reference`.

    Args:
      q, k, v, causal, scale, q_offset: as in `diffqkv_reference`.
      top_n: N, V rows fetched per query and head (the paper's Sel.V-top100 uses 100); clamped to S.
      renormalize: divide by the selected keys' probability mass, so the weights sum to 1.

    Returns:
      [B, T, Hq, V] in q's dtype.
    """
    if top_n < 1:
        raise ValueError(f"selective V: top_n must be positive, got {top_n}")
    H = q.shape[2]
    probs_BHTS = safe_softmax(masked_logits(q, k, causal=causal, scale=scale, q_offset=q_offset))
    # lax.top_k breaks ties towards the lower index, so the selection is deterministic.
    alpha_BHTN, idx_BHTN = jax.lax.top_k(probs_BHTS, min(top_n, k.shape[1]))
    if renormalize:
        mass = jnp.sum(alpha_BHTN, axis=-1, keepdims=True)
        alpha_BHTN = alpha_BHTN / jnp.where(mass > 0, mass, 1.0)
    # Gather only the selected V rows, v[b, idx[b, h, t, n], hv(h)], without repeating V per query head.
    B = v.shape[0]
    b_B111 = jnp.arange(B)[:, None, None, None]
    hv_1H11 = head_index(H, v.shape[2])[None, :, None, None]
    rows_BHTNV = v[b_B111, idx_BHTN, hv_1H11].astype(jnp.float32)
    return jnp.einsum("BHTN,BHTNV->BTHV", alpha_BHTN, rows_BHTNV).astype(q.dtype)
