"""Pallas kernels inside a sharded program: every `pallas_call` goes through `jax.shard_map` over the mesh in context.

Mosaic (TPU) and Triton (GPU) kernels cannot be partitioned by XLA's SPMD partitioner: jit of a kernel whose inputs
are sharded over a mesh with more than one device fails at lowering ("Mosaic kernels cannot be automatically
partitioned. Please wrap the call in a shard_map."). `shard_kernel` wraps a kernel call in `jax.shard_map` over the
mesh that is in context (`jax.set_mesh`, which the Trainer uses for every step; the abstract mesh inside jit), so each
device runs the kernel on its own block of the batch and, where the mesh has a `tensor` axis, of the heads.

Which mesh axes each logical dimension uses (effarch's mesh axes are data, fsdp, tensor: train/sharding.py):
- "heads" -> the `tensor` axis (the default sharding rules put heads and kv_heads there), when it divides every
  dimension labelled "heads";
- "batch" -> every other non-manual mesh axis of size > 1 whose size divides every dimension labelled "batch"
  (the default rules put the batch over data and fsdp), taken in mesh order, an axis that does not divide skipped.

Any choice is correct: an input sharded otherwise is resharded by XLA before the kernel (a slice, or a gather for
axes the specs leave out), the output after it. These specs are the ones the default rules' activations already
have, so nothing moves. Axes that are already manual (a caller's own shard_map) are left alone. Without a mesh, or
when no axis of size > 1 applies, the kernel is called as it is.

check_vma=False: jax's HLO interpreter (interpret mode, the CPU tests) fails the varying-axes check inside
shard_map, and every input and output of these kernels is split over exactly the axes its specs name, so there is
nothing for the check to infer (tests/pallas_kernels/test_shard_map.py checks the compiled kernels' types with it on).
"""

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH, HEADS = "batch", "heads"
HEAD_AXES = ("tensor",)  # the mesh axis that the default rules shard heads over (train/config.py DEFAULT_RULES)

# Per array dimension: BATCH, HEADS or None (not split), e.g. (BATCH, None, HEADS, None) for [B, T, H, K].
Axes = tuple[str | None, ...]


def _free_axes(mesh) -> list[str]:
    """Mesh axes of size > 1 that a shard_map here may still split over (not already manual)."""
    return [name for name, size in mesh.shape.items() if size > 1 and name not in mesh.manual_axes]


def kernel_specs(mesh, in_axes: Sequence[Axes], shapes: Sequence[tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """{logical name: mesh axes} for the given mesh and input shapes (the module docstring's rule)."""
    free = _free_axes(mesh)

    def dims(name):
        return [shape[i] for axes, shape in zip(in_axes, shapes, strict=True) for i, a in enumerate(axes) if a == name]

    def fits(axes, name):
        size = math.prod(mesh.shape[a] for a in axes)
        return all(d % size == 0 for d in dims(name))

    heads = tuple(a for a in HEAD_AXES if a in free)
    if not (heads and dims(HEADS) and fits(heads, HEADS)):
        heads = ()
    batch: tuple[str, ...] = ()
    for axis in free:
        if axis not in heads and fits((*batch, axis), BATCH):
            batch = (*batch, axis)
    return {BATCH: batch if dims(BATCH) else (), HEADS: heads}


def _spec(axes: Axes, table: dict[str, tuple[str, ...]]) -> P:
    def one(name):
        mesh_axes = table.get(name, ()) if name else ()
        return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes

    return P(*(one(a) for a in axes))


def shard_kernel(fn: Callable, in_axes: Sequence[Axes], out_axes: Axes | tuple[Axes, ...]) -> Callable:
    """`fn` (array arguments only) run per device block under `jax.shard_map` over the mesh in context.

    Args:
      fn: the kernel call, positional array arguments.
      in_axes: one Axes per argument, naming its BATCH and HEADS dimensions.
      out_axes: the output's Axes, or a tuple of Axes for a tuple of outputs.

    Returns:
      A function of the same arguments; `fn` itself when there is no mesh with a free axis of size > 1 to use.
    """

    def call(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not _free_axes(mesh):
            return fn(*args)
        table = kernel_specs(mesh, in_axes, [x.shape for x in args])
        if not any(table.values()):
            return fn(*args)
        is_tuple = bool(out_axes) and isinstance(out_axes[0], tuple)
        out_specs = tuple(_spec(a, table) for a in out_axes) if is_tuple else _spec(out_axes, table)
        # Every non-manual axis goes manual, size-1 ones too: an axis left automatic inside would again ask XLA to
        # partition the kernel.
        auto = frozenset(a for a in mesh.axis_names if a not in mesh.manual_axes)
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(_spec(a, table) for a in in_axes), out_specs=out_specs,
                               axis_names=auto, check_vma=False)
        return mapped(*args)

    return call
