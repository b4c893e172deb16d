"""effarch layers inside Flax Linen models, through `flax.nnx.bridge`.

`to_linen(cls, *args, **kwargs)` is `nnx.bridge.to_linen` with one change: a parameter's `logical_axes` (the axis
names every effarch layer gives its weights, e.g. ("embed", "heads")) becomes a Linen `nn.LogicallyPartitioned`
box, so Linen's logical sharding (`nn.get_partition_spec`, `nn.logical_to_mesh_sharding`) sees the same names the
effarch trainer uses. Parameters without axis names are plain arrays. `flax.linen.unbox(params)` strips the boxes.

The wrapper builds the NNX module from `cls(*args, **kwargs, rngs=...)` at init and from the Linen variables at
apply. Every public method of the NNX class is reachable through the wrapper (`wrapped.decode_step(state, x_t)`),
so a Linen model can decode with an effarch mixer's `init_state` / `prefill` / `decode_step`.

Example (docs/layers.md has a whole Linen model, run as a test):

    class MyLM(nn.Module):
        def setup(self):
            self.mixer = to_linen(BasedLinearAttention, 64, BasedConfig(n_heads=2))

        def __call__(self, x):
            return x + self.mixer(x)
"""

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx
from flax.nnx import bridge


def _to_linen_var(variable: nnx.Variable) -> Any:
    value = variable.get_value()
    names = variable.get_metadata().get("logical_axes")
    if names is None:
        return value
    return nn.LogicallyPartitioned(value, names=tuple(names))


def to_linen(nnx_class: Callable[..., nnx.Module], *args, name: str | None = None, **kwargs) -> bridge.ToLinen:
    """A Linen module wrapping `nnx_class(*args, **kwargs, rngs=...)`.

    Args:
      nnx_class: an effarch layer class (not an instance), e.g. `BasedLinearAttention`, or any NNX module class or
        factory that takes `rngs=` (e.g. `effarch.layers.rms_norm`).
      *args, **kwargs: its constructor arguments, without `rngs` (the wrapper draws them from Linen's "params" rng).
        They must be hashable (configs are frozen dataclasses, so they are).
      name: the Linen submodule name (default: Linen's automatic one).
      A class whose constructor has no `rngs` parameter (e.g. `SRMSNorm`) is built without one.

    Returns:
      A Linen module. Call it like the NNX layer; call a method with `wrapped.decode_step(state, x_t)`.
    """
    if "rngs" in kwargs:
        raise ValueError("to_linen: pass the constructor arguments without rngs; Linen supplies the rng")
    # NNX's metaclass hides a class's own signature behind (*args, **kwargs), so read __init__'s.
    params = inspect.signature(nnx_class.__init__ if isinstance(nnx_class, type) else nnx_class).parameters
    skip_rng = "rngs" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values())
    return bridge.to_linen(nnx_class, *args, metadata_fn=_to_linen_var, name=name, skip_rng=skip_rng, **kwargs)
