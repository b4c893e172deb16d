"""Auxiliary losses that layers hand to the training loop (MoH's load balance, any future router or regulariser).

A layer that has one holds an `AuxLoss` variable, created in `__init__` (so it is part of the module's graph) and
overwritten with a scalar on every parallel forward pass. The loss function (train/train.py) calls
`collect_aux_losses` after the forward pass, adds their sum times `train.aux_loss_weight` (β) to the task loss and
logs each one by name. Decoding (`prefill` / `decode_step`) leaves them alone.

Because the value is written during the forward pass, call such a layer eagerly or as an argument of an NNX or JAX
transform (`jax.jit(f)(model, x)`, `nnx.jit`, `nnx.remat`); jax.jit over a closure that captures the model cannot
write it (flax raises TraceContextError), and `jax.checkpoint` would drop the write (arches/lm.py uses nnx.remat).
"""

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float


class AuxLoss(nnx.Variable):
    """A scalar auxiliary loss of one layer, from its latest parallel forward pass (0 before the first)."""


def zero_aux_loss() -> AuxLoss:
    return AuxLoss(jnp.zeros((), jnp.float32))


def collect_aux_losses(module: nnx.Module) -> dict[str, Float[Array, ""]]:
    """Every AuxLoss under `module`, keyed by its path ("blocks/1/mixer/load_balance")."""
    flat = nnx.to_flat_state(nnx.state(module, AuxLoss))
    return {"/".join(map(str, path)): var[...] for path, var in flat}
