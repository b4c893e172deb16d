"""The "pallas_gpu" and "pallas_tpu" implementations of `based_linear_attention`: the kernels of pallas_gpu.py and
pallas_tpu.py under one `jax.custom_vjp`, plus the up-front platform check that lets dispatch fall back.

Kept apart from api.py so that api.py's dispatch stays a table of implementations. The forward saves only q, k and
v; the backward kernels recompute the feature maps and the chunk states (README.md, "Kernels").
"""

import functools

import jax
from jaxtyping import Array, Float

from effarch.pallas_kernels.based import pallas_gpu, pallas_tpu
from effarch.pallas_kernels.interpret import Interpret, resolve_interpret
from effarch.pallas_kernels.shard import BATCH, HEADS, shard_kernel

_OP = "based_linear_attention"
_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
_PLATFORMS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def based_pallas(q, k, v, name: str, chunk_size: int, eps: float, interpret: Interpret):
    """The kernel pair `name` ("pallas_gpu" or "pallas_tpu") as one differentiable function of (q, k, v)."""
    return _KERNELS[name].based_fwd(q, k, v, chunk_size=chunk_size, eps=eps, interpret=interpret)


def _fwd(q, k, v, name, chunk_size, eps, interpret):
    return based_pallas(q, k, v, name, chunk_size, eps, interpret), (q, k, v)


def _bwd(name, chunk_size, eps, interpret, residuals, d_out):
    q, k, v = residuals
    return _KERNELS[name].based_bwd(q, k, v, d_out, chunk_size=chunk_size, eps=eps, interpret=interpret)


based_pallas.defvjp(_fwd, _bwd)


def based_pallas_impl(
    name: str,
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    *,
    chunk_size: int,
    eps: float,
    interpret: Interpret | None = None,
) -> Float[Array, "B T H V"]:
    """Runs kernel `name` after checking its platform (NotImplementedError before any work if it cannot run here),
    inside `jax.shard_map` over batch and heads when a multi-device mesh is in context (pallas_kernels/shard.py).

    interpret: None follows EFFARCH_PALLAS_INTERPRET and otherwise needs the kernel's platform
    (pallas_kernels/interpret.py); True / InterpretParams interpret; False compiles without a platform check.
    """
    interpret = resolve_interpret(_OP, name, _PLATFORMS[name], interpret)

    def kernel(q, k, v):
        return based_pallas(q, k, v, name, chunk_size, eps, interpret)

    # Per device block of batch and heads under a multi-device mesh (pallas_kernels/shard.py).
    x = (BATCH, None, HEADS, None)
    return shard_kernel(kernel, (x, x, x), x)(q, k, v)
