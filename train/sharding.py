"""Device mesh (data, fsdp, tensor) and the map from logical axis names to mesh axes (docs/training.md, "Sharding").

Layers tag each parameter with `logical_axes` metadata (e.g. ("embed", "mlp")); `param_specs` turns those tags
into PartitionSpecs through the config's rules. The same code runs on one CPU (every mesh axis of size 1).
"""

import math
import warnings

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.train import param_tree

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are available")
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical_axes, shape, rules, mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical name maps to its mesh axes, skipping axes already used, of
    size 1, or that do not divide the dimension (that dimension is then replicated, with a warning)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            warnings.warn(f"sharding: dim {dim} of logical axis {name!r} does not divide mesh axes {axes} "
                          f"(size {size}); replicating it", stacklevel=2)
            axes = ()
        used.update(axes)
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def param_specs(abstract_state: nnx.State, rules, mesh: Mesh):
    """PartitionSpec tree matching `abstract_state` (an nnx.State of Variables with `logical_axes` metadata)."""

    def spec(var):
        axes = var.get_metadata().get("logical_axes")
        shape = var.shape if hasattr(var, "shape") else var[...].shape
        if axes is None:
            return P()
        return logical_to_spec(axes, shape, rules, mesh)

    return jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(abstract_state: nnx.State, rules, mesh: Mesh):
    """NamedShardings in exactly the tree structure of `abstract_state`'s arrays (what jit and optax expect)."""
    prefix = named(param_specs(abstract_state, rules, mesh), mesh)
    leaves, treedef = jax.tree.flatten(abstract_state)
    shardings = jax.tree.leaves(prefix, is_leaf=lambda x: isinstance(x, NamedSharding))
    assert len(shardings) == len(leaves), "one Variable per array is expected"
    return jax.tree.unflatten(treedef, shardings)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params, param_sharding, mesh: Mesh):
    """Shardings of tx's state: moments shard like their parameters, everything else (counts) is replicated.

    A moment is recognised by its path ending in a parameter's path with the parameter's shape (".../mu/blocks/0/
    mixer/q_proj/kernel"). This holds for any optax chain, including multi_transform / masked states, where
    optax.tree_map_params cannot follow the MaskedNode placeholders of frozen or undecayed parameters.
    """
    params = param_tree.flatten(abstract_params)
    shardings = param_tree.flatten(param_sharding)
    replicated = NamedSharding(mesh, P())

    def one(keypath, leaf):
        parts = param_tree.path_str(keypath).split("/")
        for i in range(len(parts)):
            suffix = "/".join(parts[i:])
            if suffix in params and tuple(params[suffix].shape) == tuple(leaf.shape):
                return shardings[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, abstract_params))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [B, T] batch: the batch axis over the mesh axes that the 'batch' rule names."""
    axes = tuple(a for a in dict(rules).get("batch", ()) if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None, None))
