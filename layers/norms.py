"""RMSNorm (Zhang & Sennrich, arXiv 1910.07467), the pre-norm of Llama-style blocks.

A thin constructor over `flax.nnx.RMSNorm`: it only adds the logical axis name of the scale, so the trainer can
shard it. The statistics are computed in float32 whatever the activation dtype.
"""

from flax import nnx


def rms_norm(d_model: int, *, eps: float = 1e-6, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm over the last axis with a learnable scale initialised to 1."""
    return nnx.RMSNorm(
        d_model,
        epsilon=eps,
        scale_init=nnx.with_metadata(nnx.initializers.ones_init(), logical_axes=("embed",)),
        rngs=rngs,
    )
