"""Rotary position embeddings (RoFormer, arXiv 2104.09864), rotate-half convention as in Llama / GPT-NeoX."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Float[Array, " K2"]:
    """Inverse frequencies theta^(-2i/K) for i < K/2."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(
    x: Float[Array, "B T H K"], positions: Int[Array, "B T"] | Int[Array, " T"], theta: float = 10000.0
) -> Float[Array, "B T H K"]:
    """Rotates pairs (x_i, x_{i+K/2}) by angle position * freq_i. Computed in float32, returned in x.dtype."""
    freqs = rope_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs.reshape((1,) * positions.ndim + (-1,))  # [B?, T, K/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
