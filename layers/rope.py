"""Rotary position embeddings (RoFormer, arXiv 2104.09864), rotate-half convention as in Llama / GPT-NeoX.

`llama3_frequencies` is Llama 3.1's long-context frequency scaling (the "llama3" rope_type of Hugging Face
transformers, modeling_rope_utils.py::_compute_llama3_parameters): wavelengths shorter than
original_max_len / high_freq_factor are kept, those longer than original_max_len / low_freq_factor are divided by
`factor`, and the band between is interpolated smoothly.
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Float[Array, " K2"]:
    """Inverse frequencies theta^(-2i/K) for i < K/2."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def llama3_frequencies(
    freqs: Float[Array, " K2"], factor: float, low_freq_factor: float, high_freq_factor: float, original_max_len: int
) -> Float[Array, " K2"]:
    """Llama 3.1 scaling of the inverse frequencies `freqs` (float32, as in transformers)."""
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = jnp.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


# AttentionConfig's RoPE scaling fields; MoHConfig and DiffQKVConfig have the same ones, so conversions copy them.
ROPE_SCALING_FIELDS = ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                       "rope_original_max_len")


def scaled_rope_frequencies(head_dim: int, config) -> Float[Array, " K2"]:
    """Inverse frequencies for a layer config with AttentionConfig's RoPE fields (rope_theta, rope_scaling and
    the four llama3 parameters): theta^(-2i/K), scaled when rope_scaling is "llama3"."""
    freqs = rope_frequencies(head_dim, config.rope_theta)
    if config.rope_scaling == "llama3":
        freqs = llama3_frequencies(freqs, config.rope_scaling_factor, config.rope_low_freq_factor,
                                   config.rope_high_freq_factor, config.rope_original_max_len)
    return freqs


def apply_rope(
    x: Float[Array, "B T H K"],
    positions: Int[Array, "B T"] | Int[Array, " T"],
    theta: float = 10000.0,
    *,
    freqs: Float[Array, " K2"] | None = None,
) -> Float[Array, "B T H K"]:
    """Rotates pairs (x_i, x_{i+K/2}) by angle position * freq_i. Computed in float32, returned in x.dtype.

    `freqs` replaces the plain theta^(-2i/K) frequencies (e.g. with `llama3_frequencies`); theta is then unused.
    """
    if freqs is None:
        freqs = rope_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs.reshape((1,) * positions.ndim + (-1,))  # [B?, T, K/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
