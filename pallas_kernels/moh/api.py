"""Mixture-of-head attention behind one `implementation=` switch (pallas_kernels/dispatch.py).

Implementations:
- "reference": reference.py; every head via the jnp attention oracle, inactive heads zeroed.
- "dense": every head via `dot_product_attention` (jax.nn / cuDNN), inactive heads zeroed; fastest when most
  heads are active or the sequence is short.
- "sparse": xla.py; only the active (token, head) pairs pay for scores, attention output and output projection.
  This is the path whose cost falls with the fraction of active heads (benchmarks/moh.py).

Default on every platform: "dense". The sparse path is chosen explicitly (MoHConfig.implementation).
"""

from collections.abc import Sequence

from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.dispatch import dispatch
from effarch.pallas_kernels.moh.reference import mixture_of_heads_reference
from effarch.pallas_kernels.moh.xla import dense_gated, sparse_pairs

OP = "mixture_of_heads_attention"
DEFAULT_ORDER = {"cpu": ("dense",), "gpu": ("dense",), "tpu": ("dense",)}


def _reference(q, k, v, heads, gates, w_o, *, q_positions, block_size):
    return mixture_of_heads_reference(q, k, v, heads, gates, w_o, q_positions=q_positions)


def _dense(q, k, v, heads, gates, w_o, *, q_positions, block_size):
    return dense_gated(q, k, v, heads, gates, w_o, q_positions=q_positions)


def _sparse(q, k, v, heads, gates, w_o, *, q_positions, block_size):
    return sparse_pairs(q, k, v, heads, gates, w_o, q_positions=q_positions, block_size=block_size)


IMPLEMENTATIONS = {"reference": _reference, "dense": _dense, "sparse": _sparse}


def mixture_of_heads_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hkv K"],
    v: Float[Array, "B S Hkv V"],
    heads: Int[Array, "B T A"],
    gates: Float[Array, "B T A"],
    w_o: Float[Array, "H V D"],
    *,
    q_positions: Int[Array, " T"] | None = None,
    block_size: int = 16,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T D"]:
    """Causal MoH attention: y_t = Σ_a gates[t, a] · softmax(q_{t,h} K_hᵀ / √K) V_h W_O^h with h = heads[t, a].

    Args:
      q: queries, [B, T, H, K].
      k: keys, [B, S, Hkv, K]; H must be a multiple of Hkv (query head h reads KV head h // (H // Hkv)).
      v: values, [B, S, Hkv, V].
      heads: the active heads of each token, [B, T, A] with 1 <= A <= H, distinct within a token.
      gates: the active heads' gates, [B, T, A]; gradients flow through them.
      w_o: the output projection split by head, [H, V, D] (the o_proj kernel [H·V, D] reshaped).
      q_positions: absolute query positions [T] against a KV cache (query at p sees keys <= p); None means the
        parallel form, positions 0..T-1 with S == T.
      block_size: pairs per block of the sparse path (capped at T); other paths ignore it.
      implementation: "reference", "dense", "sparse", a sequence of them, or None ("dense").

    Returns:
      [B, T, D] in q's dtype.
    """
    B, T, H = q.shape[:3]
    if H % k.shape[2]:
        raise ValueError(f"{OP}: query heads {H} must be a multiple of kv heads {k.shape[2]}")
    if heads.shape[:2] != (B, T) or gates.shape != heads.shape or not 1 <= heads.shape[2] <= H:
        raise ValueError(f"{OP}: heads {heads.shape} and gates {gates.shape} must both be [B={B}, T={T}, A <= {H}]")
    if w_o.shape[:2] != (H, v.shape[-1]):
        raise ValueError(f"{OP}: w_o {w_o.shape} must be [H={H}, V={v.shape[-1]}, D]")
    if q_positions is None and k.shape[1] != T:
        raise ValueError(f"{OP}: without q_positions keys must have the queries' length {T}, got {k.shape[1]}")
    if block_size < 1:
        raise ValueError(f"{OP}: block_size must be positive, got {block_size}")
    return dispatch(OP, IMPLEMENTATIONS, implementation, q, k, v, heads, gates, w_o, q_positions=q_positions,
                    block_size=block_size, default_order=DEFAULT_ORDER)
