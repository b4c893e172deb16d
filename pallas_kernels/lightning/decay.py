"""Fixed per-head, per-layer decay rates of TransNormerLLM (the OpenNLPLab code convention).

Paper: TransNormerLLM, arXiv 2307.14995 (eq. 10); ALiBi slopes from arXiv 2108.12409.
Reference: OpenNLPLab/lightning-attention@d15c385, lightning_attn/utils/utils.py::_build_slope_tensor and
examples/module/tnl_attn.py (slope_rate * (1 - layer_idx / (num_layers - 1) + 1e-5)).

Choices:
- the code convention, not paper eq. 10 as printed (λ = exp(−(8h/H)(1 − l/L)), which fla implements and which gives
  head 0 no decay);
- a single-layer model (L = 1), where l/(L−1) is 0/0, uses the first-layer factor 1 + 1e-5.
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Float


def _power_of_2_slopes(n_heads: int) -> list[float]:
    return [2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)]


def alibi_slopes(n_heads: int) -> Float[Array, " H"]:
    """slope_h = 2^(−8(h+1)/H) for a power-of-2 H; otherwise the ALiBi interleave rule.

    For a non-power-of-2 H with P the largest power of 2 below it, the slopes are the P slopes of P heads followed
    by every other slope of 2P heads (the ones P heads do not already have), up to H in all. H = 8 gives
    [0.5, 0.25, ..., 2^-8]; H = 3 gives [2^-4, 2^-8, 2^-2].
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = _power_of_2_slopes(closest)
    if closest != n_heads:
        slopes += _power_of_2_slopes(2 * closest)[0::2][: n_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def tnl_decay(n_heads: int, layer_idx: int, n_layers: int) -> Float[Array, " H"]:
    """Decay rates s_{h,l} = slope_h · (1 − l/(L−1) + 1e-5) for layer l (0-indexed) of L; λ = exp(−s).

    The first layer decays fastest; the last keeps only the 1e-5 floor, i.e. almost no decay.
    """
    if not 0 <= layer_idx < n_layers:
        raise ValueError(f"layer_idx must be in [0, n_layers={n_layers}), got {layer_idx}")
    depth = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
    return alibi_slopes(n_heads) * (1.0 - depth + 1e-5)
