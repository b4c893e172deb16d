"""Parameter paths: the names that freeze patterns, weight-decay masks and fine-tuning match parameters by.

A model's parameters are an `nnx.State` whose leaves sit under `nnx.Variable` nodes; the path of a parameter is
its keys joined by "/", e.g. "blocks/0/mixer/q_proj/kernel" or "embed/embedding" (the Variable's own `.value`
attribute is not part of the name). The same names come out of an Orbax checkpoint's metadata tree, so a
checkpoint written by one model can be matched against another model's parameters.
"""

import jax
from flax import nnx


def path_str(keypath) -> str:
    """'blocks/0/mixer/q_proj/kernel' from a jax key path (DictKey / SequenceKey / GetAttrKey entries).

    A checkpoint stores each Variable as {"value": array}: that trailing "value" is dropped too, so the paths of a
    saved tree and of a live nnx.State agree."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":  # the Variable's payload, not a name level
                parts.append(k.name)
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value" and isinstance(keypath[-1], jax.tree_util.DictKey):
        parts.pop()
    return "/".join(parts)


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def flatten(tree) -> dict[str, object]:
    """{path: leaf} over the arrays of a parameter tree (an nnx.State, or a checkpoint's nested dicts)."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def map_variables(fn, abstract_params):
    """A tree shaped like `abstract_params`' arrays whose leaf at each parameter is fn(path, variable).

    optax masks and labels need exactly the structure of the parameter tree (Variable nodes included), and the
    Variable carries the metadata (logical axes, weight_decay) the decision may read.
    """

    def one(keypath, var):
        return var.replace(fn(path_str(keypath), var))

    return jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=is_variable)
