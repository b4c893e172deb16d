"""Normalisations: RMSNorm (Zhang & Sennrich, arXiv 1910.07467), the pre-norm of Llama-style blocks, and
TransNormerLLM's weightless SRMSNorm (arXiv 2307.14995).

`rms_norm` is a thin constructor over `flax.nnx.RMSNorm`: it only adds the logical axis name of the scale, so the
trainer can shard it. Statistics are computed in float32 whatever the activation dtype.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.linear import logical_init


def rms_norm(d_model: int, *, eps: float = 1e-6, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm over the last axis with a learnable scale initialised to 1."""
    return nnx.RMSNorm(
        d_model,
        epsilon=eps,
        scale_init=logical_init(("embed",), nnx.initializers.ones_init()),
        rngs=rngs,
    )


def srms_norm(x: Float[Array, "*B D"], eps: float = 1e-6) -> Float[Array, "*B D"]:
    """SRMSNorm(x) = x / sqrt(mean(x²) + eps) = x / (‖x‖₂/√D), no weight; statistics in float32."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class SRMSNorm(nnx.Module):
    """Module form of `srms_norm` (no parameters), so a block can hold either norm."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        return srms_norm(x, self.eps)
