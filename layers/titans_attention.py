"""The attention half of Titans' hybrids (arXiv 2501.00663 §4): its config and attention with a persistent prefix.

MAC (layers/titans_mac.py) attends inside a segment to [persistent || retrieved memory || segment]; MAG
(layers/titans_mag.py) uses sliding-window attention whose persistent prefix every query sees (SW-Attn*, paper
Fig. 3b); MAL (layers/titans_mal.py) uses the plain SlidingWindowAttention layer. The softmax is always the existing
`pallas_kernels.attention.dot_product_attention` with a boolean mask; the projections and RoPE are those of
`layers.attention.Attention`.

Choices (the paper is silent):
- a persistent token p_i enters attention as the key/value pair (p_i W_K, p_i W_V) with no rotary embedding: it has
  no position, so every query reads it the same way (titans-pytorch's SegmentedAttention also leaves its persistent
  keys unrotated).
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.rope import apply_rope
from effarch.pallas_kernels.attention import dot_product_attention


@dataclasses.dataclass(frozen=True, slots=True)
class TitansAttentionConfig:
    n_heads: int = 4  # attention heads; head dim = d_model // n_heads
    window: int = 64  # MAG / MAL: keys per query of the sliding window, t - window < j <= t
    segment_len: int = 64  # MAC: tokens per segment (a multiple of titans.chunk_size)
    # MAC: each query also sees the previous segment_len tokens across the segment start (their h and x), as
    # titans-pytorch's `sliding_window_attn`; False: attention stays inside the segment (the paper's Fig. 2).
    sliding: bool = False
    rope_theta: float = 10000.0
    implementation: str | None = None  # dot_product_attention / sliding_window_attention backend

    def __post_init__(self):
        for name in ("n_heads", "window", "segment_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"titans_attention.{name} must be positive, got {getattr(self, name)}")
        if not self.rope_theta > 0:
            raise ValueError(f"titans_attention.rope_theta must be positive, got {self.rope_theta}")


def make_attention(d_model: int, config: TitansAttentionConfig, rngs: nnx.Rngs) -> Attention:
    """The q/k/v/o projections with RoPE (the softmax itself is called by the hybrids with their masks)."""
    if d_model % config.n_heads:
        raise ValueError(f"titans_attention.n_heads={config.n_heads} must divide d_model={d_model}")
    return Attention(d_model, AttentionConfig(n_heads=config.n_heads, rope_theta=config.rope_theta,
                                              implementation=config.implementation), rngs=rngs)


def key_values(attn: Attention, x: Float[Array, "B T D"], positions=None):
    """k, v [B, T, H, K] of tokens x; rotated at `positions` unless None (persistent tokens: no position)."""
    k = attn.k_proj(x).reshape(*x.shape[:2], attn.config.kv_heads, attn.head_dim)
    v = attn.v_proj(x).reshape(*x.shape[:2], attn.config.kv_heads, attn.head_dim)
    if positions is not None:
        k = apply_rope(k, positions, freqs=attn.rope_frequencies())
    return k, v


def persistent_key_values(attn: Attention, persistent: Float[Array, "P D"] | None, batch_size: int):
    """k, v [B, P, H, K] of the persistent tokens (P = 0 when there are none)."""
    H, K = attn.config.kv_heads, attn.head_dim
    if persistent is None:
        empty = jnp.zeros((batch_size, 0, H, K), jnp.float32)
        return empty, empty
    k, v = key_values(attn, persistent[None])
    return (jnp.broadcast_to(k, (batch_size, *k.shape[1:])), jnp.broadcast_to(v, (batch_size, *v.shape[1:])))


def prefixed_attention(attn: Attention, q: Float[Array, "B T H K"], k: Float[Array, "B S H K"],
                       v: Float[Array, "B S H K"], visible: Bool[Array, "B T S"], pk: Float[Array, "B P H K"],
                       pv: Float[Array, "B P H K"]) -> Float[Array, "B T H K"]:
    """softmax attention of q over [persistent || k] where every query sees the whole persistent prefix."""
    B, T, P = q.shape[0], q.shape[1], pk.shape[1]
    mask = jnp.concatenate([jnp.ones((B, T, P), bool), visible], axis=2)
    return dot_product_attention(q, jnp.concatenate([pk, k.astype(pk.dtype)], 1).astype(q.dtype),
                                 jnp.concatenate([pv, v.astype(pv.dtype)], 1).astype(q.dtype), causal=False,
                                 mask=mask, implementation=attn.config.implementation)


def window_prefix_attention(attn: Attention, q: Float[Array, "B T H K"], k: Float[Array, "B T H K"],
                            v: Float[Array, "B T H K"], k_prev: Float[Array, "B W H K"],
                            v_prev: Float[Array, "B W H K"], pos: int | Int[Array, ""], pk: Float[Array, "B P H K"],
                            pv: Float[Array, "B P H K"]) -> Float[Array, "B T H K"]:
    """SW-Attn*: query t (absolute position pos + t) sees keys t - W < j <= t and the persistent prefix.

    k_prev, v_prev hold the W tokens before this call (positions pos - W .. pos - 1; negative ones do not exist). The
    queries go in blocks of Q = min(W, T); block b sees the W + Q keys that can fall in its windows, so the cost is
    O(T (P + W + Q)) rather than O(T^2), and a one-token decode step attends to P + W + 1 keys.
    """
    B, T = q.shape[:2]
    W = k_prev.shape[1]
    Q = min(W, T)
    nb = -(-T // Q)
    pad = nb * Q - T
    keys = jnp.pad(jnp.concatenate([k_prev, k.astype(k_prev.dtype)], 1), ((0, 0), (0, pad), (0, 0), (0, 0)))
    vals = jnp.pad(jnp.concatenate([v_prev, v.astype(v_prev.dtype)], 1), ((0, 0), (0, pad), (0, 0), (0, 0)))
    idx = Q * jnp.arange(nb)[:, None] + jnp.arange(W + Q)[None]  # [nb, W + Q] rows of `keys`
    k_pos = pos - W + idx  # absolute positions of those keys
    q_pos = pos + Q * jnp.arange(nb)[:, None] + jnp.arange(Q)[None]  # [nb, Q]
    visible = ((k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] > q_pos[:, :, None] - W)
               & (k_pos[:, None, :] >= 0))  # [nb, Q, W + Q]

    def fold(x):  # [B, nb, ...] -> [B * nb, ...]
        return x.reshape(B * nb, *x.shape[2:])

    qb = fold(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, nb, Q, *q.shape[2:]))
    o = prefixed_attention(attn, qb, fold(keys[:, idx]), fold(vals[:, idx]),
                           jnp.broadcast_to(visible, (B, nb, Q, W + Q)).reshape(B * nb, Q, W + Q),
                           *(jnp.repeat(x, nb, axis=0) for x in (pk, pv)))
    return o.reshape(B, nb * Q, *o.shape[2:])[:, :T]
