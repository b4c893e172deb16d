"""The kernel initializer and the linear projection every layer builds its weights with.

Kernels are lecun-normal (flax's default) and carry their logical axes ("embed", "heads", "kv_heads", "mlp" or None)
as metadata, which is how a sharding rule finds them; a bias carries the output axis.
"""

from flax import nnx


def logical_init(axes: tuple[str | None, ...], base: nnx.Initializer | None = None) -> nnx.Initializer:
    """`base` (lecun-normal when None) tagged with the parameter's logical axes."""
    return nnx.with_metadata(nnx.initializers.lecun_normal() if base is None else base, logical_axes=axes)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs, *, use_bias: bool = False,
           bias_init: float = 0.0) -> nnx.Linear:
    """x [..., d_in] -> [..., d_out], kernel [d_in, d_out] on `axes`; with use_bias, a bias filled with bias_init on
    axes[1]."""
    bias = logical_init(axes[1:], nnx.initializers.constant(bias_init))
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=logical_init(axes), bias_init=bias, rngs=rngs)
