"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on a model's linear layers, and their merge.

`add_lora(model, rank, alpha, targets, rngs)` replaces, in place, every `nnx.Linear` whose kernel path (e.g.
"blocks/0/mixer/q_proj/kernel") a `targets` regex matches (re.search) by a `LoRALinear`: flax's `nnx.LoRALinear`
holding the same kernel and bias Variables (same values, same logical-axes metadata) plus an `nnx.LoRA` adapter,

    y = x W + b + (alpha / rank) · x A B,      A [d_in, r] (he-uniform), B [r, d_out] (zeros)        (§4.1, eq. 3)

so the model computes exactly the same function until B moves. The parameter paths are nnx.LoRALinear's: the base
weights keep theirs (".../q_proj/kernel": a checkpoint of the model without adapters loads into it by path) and the
adapter adds ".../q_proj/lora/lora_a" and ".../q_proj/lora/lora_b", of type `nnx.LoRAParam` (a `nnx.Param`).
A's logical axes are (the kernel's input axis, None) and B's (None, the kernel's output axis): each shards like
the kernel it adapts, the rank axis replicated.

`merge_lora(model)` folds each adapter into its kernel, W' = W + (alpha / rank) · A B, and puts a plain `nnx.Linear`
back: the model without adapters, computing the same function (to float rounding).

A layer that reads a linear layer's kernel as a matrix instead of calling it (MoH's per-head output projection)
reads `kernel_of(layer)`, which includes the adapter.
"""

import re
from collections.abc import Sequence

import jax
from flax import nnx


class LoRALinear(nnx.LoRALinear):
    """`base` (a 2-D nnx.Linear) with a rank-`rank` adapter scaled by alpha / rank: x [..., d_in] -> [..., d_out]."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        if base.kernel.ndim != 2:
            raise ValueError(f"LoRA adapts 2-D kernels [d_in, d_out], got shape {base.kernel.shape}")
        d_in, d_out = base.kernel.shape
        axes = base.kernel.get_metadata().get("logical_axes") or (None, None)
        # kernel_init hands nnx.Linear the existing kernel (no new random matrix); the Variables themselves are then
        # put in place, so the metadata and values are the base layer's own.
        super().__init__(d_in, d_out, lora_rank=rank, use_bias=base.use_bias, dtype=base.dtype,
                         param_dtype=base.param_dtype, precision=base.precision,
                         kernel_init=lambda *_: base.kernel[...], rngs=rngs,
                         a_metadata={"logical_axes": (axes[0], None)}, b_metadata={"logical_axes": (None, axes[1])})
        self.kernel, self.bias = base.kernel, base.bias
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.Linear.__call__(self, x) + self.scale * self.lora(x)

    def delta(self) -> jax.Array:
        """(alpha / rank) · A B [d_in, d_out]: what the adapter adds to the kernel."""
        return self.scale * (self.lora.lora_a[...] @ self.lora.lora_b[...])


def kernel_of(layer: nnx.Linear) -> jax.Array:
    """The effective kernel [d_in, d_out] of a linear layer: W, or W + (alpha / rank) · A B under an adapter."""
    if isinstance(layer, LoRALinear):
        return layer.kernel[...] + layer.delta().astype(layer.kernel.dtype)
    return layer.kernel[...]


def linear_paths(model: nnx.Module) -> dict[str, nnx.Linear]:
    """{kernel path: layer} of the model's linear layers ("blocks/0/mixer/q_proj/kernel": ...), in graph order."""
    return {"/".join(map(str, path)) + "/kernel": node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Linear) and path}


def _replace(model: nnx.Module, kernel_path: str, new: nnx.Module) -> None:
    keys = [int(k) if k.isdigit() else k for k in kernel_path.split("/")[:-1]]
    parent = model
    for k in keys[:-1]:
        parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(keys[-1], int):
        parent[keys[-1]] = new
    else:
        setattr(parent, keys[-1], new)


def add_lora(model: nnx.Module, rank: int, alpha: float, targets: Sequence[str], *, rngs: nnx.Rngs) -> list[str]:
    """Wraps the linear layers whose kernel path a `targets` regex matches with adapters, in place; returns their
    kernel paths. ValueError, naming it, for a regex that matches no linear layer."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    layers = linear_paths(model)
    patterns = [re.compile(t) for t in targets]
    for t, p in zip(targets, patterns, strict=True):
        if not any(p.search(path) for path in layers):
            shown = ", ".join(list(layers)[:4]) or "none"
            raise ValueError(f"targets: {t!r} matches no linear layer's kernel path (the model's are e.g. {shown})")
    chosen = [path for path in layers if any(p.search(path) for p in patterns)]
    for path in chosen:
        layer = layers[path]
        if isinstance(layer, LoRALinear):
            raise ValueError(f"targets: {path} already has an adapter")
        if layer.kernel.ndim != 2:
            raise ValueError(f"targets: {path} is {layer.kernel.ndim}-D; LoRA adapts 2-D kernels [d_in, d_out]")
        _replace(model, path, LoRALinear(layer, rank, alpha, rngs=rngs))
    return chosen


def merge_lora(model: nnx.Module) -> list[str]:
    """Folds every adapter into its kernel and puts a plain nnx.Linear back, in place; returns the kernel paths."""
    merged = [(path, layer) for path, layer in linear_paths(model).items() if isinstance(layer, LoRALinear)]
    for path, layer in merged:
        d_in, d_out = layer.kernel.shape
        plain = nnx.Linear(d_in, d_out, use_bias=layer.use_bias, dtype=layer.dtype, param_dtype=layer.param_dtype,
                           precision=layer.precision, kernel_init=lambda *_, layer=layer: layer.kernel[...],
                           rngs=nnx.Rngs(0))
        plain.kernel = layer.kernel.replace(kernel_of(layer))
        plain.bias = layer.bias
        _replace(model, path, plain)
    return [path for path, _ in merged]
