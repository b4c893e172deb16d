"""Output shapes of `pl.pallas_call` that also work inside `jax.shard_map`.

Under `shard_map(check_vma=True)` (the default) every value carries the set of manual mesh axes it varies over,
and a `pallas_call`'s `out_shape` must say it too (`manual_axis_type`), or tracing fails with "`manual_axis_type` on
`jax.ShapeDtypeStruct` must not be `None`". `jax.ShapeDtypeStruct.like(x)` does that only for x's own shape; kernels
whose outputs have other shapes (padded T, a state) use `out_struct`. Outside shard_map the set is empty and this
is a plain ShapeDtypeStruct. Same API in jax 0.11.2 and 0.12 (`manual_axis_type=`, `jax.typeof(x).mat`).
"""

import jax


def out_struct(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct of `shape` and `dtype` varying over the same manual mesh axes as `like`."""
    mat = jax.typeof(like).mat
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=None if mat.empty else mat)
