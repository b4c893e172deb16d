"""Mixture-of-head attention oracle: every head attends, inactive heads are multiplied by a zero gate.

MoH (arXiv 2410.11842, eq. 2-3) writes multi-head attention as a sum over heads, MoH(x_t) = Σ_h g_th H_th W_O^h,
with g_th = 0 for the heads token t does not use. This file is the literal reading: it pays for every head and
zeroes the unused ones, so it is the truth the "sparse" path of api.py (which only computes the used
(token, head) pairs) is tested against.

Conventions:
- q [B, T, H, K], k [B, S, Hkv, K], v [B, S, Hkv, V]; query head h reads KV head h // (H // Hkv) (GQA grouping);
- a token's active heads are listed in `heads` [B, T, A] (distinct per token) with their gates in `gates` [B, T, A];
- attention is causal on absolute positions: the query at position p sees keys s <= p, scale 1 / sqrt(K).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.attention import attention_reference


def dense_head_gates(heads: Int[Array, "B T A"], gates: Float[Array, "B T A"], n_heads: int) -> Float[Array, "B T H"]:
    """Scatters the active heads' gates into a dense [B, T, H] gate with zeros on the inactive heads."""
    one_hot_BTAH = jax.nn.one_hot(heads, n_heads, dtype=gates.dtype)
    return jnp.einsum("BTA,BTAH->BTH", gates, one_hot_BTAH)


def causal_mask(q_positions: Int[Array, " T"], batch: int, n_keys: int):
    """[B, T, S] boolean: the query at absolute position p sees keys 0..p."""
    visible_TS = jnp.arange(n_keys)[None, :] <= q_positions[:, None]
    return jnp.broadcast_to(visible_TS[None], (batch, *visible_TS.shape))


def mixture_of_heads_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hkv K"],
    v: Float[Array, "B S Hkv V"],
    heads: Int[Array, "B T A"],
    gates: Float[Array, "B T A"],
    w_o: Float[Array, "H V D"],
    *,
    q_positions: Int[Array, " T"] | None = None,
) -> Float[Array, "B T D"]:
    """y_t = Σ_a gates[t, a] · attn_{heads[t, a]}(q_t) W_O[heads[t, a]], with all H heads computed.

    Args:
      q, k, v: queries [B, T, H, K], keys [B, S, Hkv, K], values [B, S, Hkv, V].
      heads: active heads of each token, [B, T, A], distinct per token.
      gates: their gates, [B, T, A].
      w_o: output projection split by head, [H, V, D].
      q_positions: absolute positions of the queries, [T]; None means 0..T-1 with S == T (the parallel form).

    Returns:
      [B, T, D] in q's dtype.
    """
    B, T, H = q.shape[:3]
    mask = None if q_positions is None else causal_mask(q_positions, B, k.shape[1])
    o_BTHV = attention_reference(q, k, v, causal=q_positions is None, mask=mask)
    g_BTH = dense_head_gates(heads, gates, H).astype(o_BTHV.dtype)
    return jnp.einsum("BTHV,BTH,HVD->BTD", o_BTHV, g_BTH, w_o.astype(o_BTHV.dtype)).astype(q.dtype)
