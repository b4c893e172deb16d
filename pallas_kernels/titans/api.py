"""Public entry points of the Titans neural memory op (arXiv 2501.00663 §3): `implementation=` dispatch.

Implementations:
- "reference": the sequential token loop (reference.py), the oracle; differentiated by autodiff through lax.scan.
- "xla": the paper's parallel form (xla.py): chunk gradients at Wref by autodiff, momentum and decay by a sequential
  scan over each block's chunks, a rematerialised scan over mini-batches.
No Pallas kernel yet: every platform runs "xla" by default.
"""

from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float

from effarch.pallas_kernels.dispatch import dispatch
from effarch.pallas_kernels.titans import reference, xla
from effarch.pallas_kernels.titans.reference import MemoryState, Params

_OP = "neural_memory_scan"
DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}
_IMPLS = {"reference": reference.neural_memory_reference, "xla": xla.neural_memory_chunked}


def _check(params, keys, values, queries, lr, momentum, decay, chunk_size, batch_size, pos):
    B, T, H, D = keys.shape
    if values.shape != keys.shape or queries.shape != keys.shape:
        raise ValueError(f"{_OP}: keys, values, queries must share a shape [B, T, H, D], got {keys.shape}, "
                         f"{values.shape}, {queries.shape}")
    if lr.shape != (B, T, H):
        raise ValueError(f"{_OP}: lr must be [B, T, H] = {(B, T, H)}, got {lr.shape}")
    if chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be >= 1, got {chunk_size}")
    if batch_size is not None and (batch_size < 1 or batch_size % chunk_size):
        raise ValueError(f"{_OP}: batch_size ({batch_size}) must be a positive multiple of chunk_size ({chunk_size})")
    n = (pos % chunk_size + T) // chunk_size if isinstance(pos, int) else None
    for name, g in (("momentum", momentum), ("decay", decay)):
        if g.shape[0] != B or g.shape[2] != H or (n is not None and g.shape[1] != n):
            raise ValueError(f"{_OP}: {name} must be [B, N, H] with N = {n} chunks completing in this call, "
                             f"got {g.shape}")
    names = reference.layer_names(params)
    if params[names[0]].shape[-2] != D or params[names[-1]].shape[-1] != D or params[names[0]].shape[0] != H:
        raise ValueError(f"{_OP}: params must map [H={H}] x D={D} -> D, got "
                         f"{ {k: v.shape for k, v in params.items()} }")


def neural_memory_scan(
    params: Params,
    keys: Float[Array, "B T H D"],
    values: Float[Array, "B T H D"],
    queries: Float[Array, "B T H D"],
    lr: Float[Array, "B T H"],
    momentum: Float[Array, "B N H"],
    decay: Float[Array, "B N H"],
    *,
    chunk_size: int = 1,
    batch_size: int | None = None,
    implementation: str | Sequence[str] | None = None,
    residual: bool = False,
    initial_state: MemoryState | None = None,
    return_state: bool = False,
    max_grad_norm: float | None = None,
):
    """Retrievals y [B, T, H, D] of a neural memory that learns from (keys, values) as it reads.

    Args:
      params: {"w1": [H, D, F], "w2": [H, F, D]}: the memory M_W(x) = gelu(x @ w1) @ w2 each (batch, head) starts
        from (more matrices w1..wL: a deeper MLP; `residual=True` adds x).
      keys, values, queries: [B, T, H, D]. lr: theta per token [B, T, H].
      momentum, decay: eta and alpha per chunk [B, N, H], N = T // chunk_size (from a state at position p:
        N = (p % chunk_size + T) // chunk_size, the chunks completing in this call).
      chunk_size: C, tokens per update. batch_size: tokens between refreshes of the gradient point (a multiple of
        C; None: every gradient at params).
      initial_state / return_state: continue from a `MemoryState` and return the state after the last token, so a
        sequence split into pieces gives the outputs of one pass.
      max_grad_norm: None (the paper's update), or c > 0: each weight matrix's chunk gradient is soft-clamped to
        norm < c before it enters the momentum (reference.py's `clamp_norm`; keeps the memory's weights bounded).
    Returns:
      y, or (y, state) when return_state.
    """
    pos = 0 if initial_state is None else initial_state.pos
    _check(params, keys, values, queries, lr, momentum, decay, chunk_size, batch_size, pos)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"{_OP}: max_grad_norm must be positive or None, got {max_grad_norm}")
    y, state = dispatch(_OP, _IMPLS, implementation, params, keys, values, queries, lr, momentum, decay,
                        chunk_size=chunk_size, batch_size=batch_size, residual=residual, initial_state=initial_state,
                        max_grad_norm=max_grad_norm, default_order=DEFAULT_ORDER)
    return (y, state) if return_state else y


def neural_memory_init_state(params: Params, batch_size: int) -> MemoryState:
    return reference.init_state(params, batch_size)


def neural_memory_retrieve(
    weights: Params, queries: Float[Array, "B T H D"], *, residual: bool = False
) -> Float[Array, "B T H D"]:
    """Retrieval without an update (eq. 15), M*_W(q_t), from per-sequence weights such as `MemoryState.w`
    ({"w1": [B, H, D, F], "w2": [B, H, F, D]})."""
    y = reference.memory_apply(weights, jnp.moveaxis(queries.astype(jnp.float32), 1, 2), residual)
    return jnp.moveaxis(y, 2, 1).astype(queries.dtype)


def neural_memory_step(
    state: MemoryState,
    k_t: Float[Array, "B H D"],
    v_t: Float[Array, "B H D"],
    q_t: Float[Array, "B H D"],
    lr_t: Float[Array, "B H"],
    momentum_t: Float[Array, "B H"],
    decay_t: Float[Array, "B H"],
    *,
    chunk_size: int = 1,
    batch_size: int | None = None,
    residual: bool = False,
    max_grad_norm: float | None = None,
) -> tuple[MemoryState, Float[Array, "B H D"]]:
    """One decoding step (store, then retrieve); momentum_t / decay_t: the gates of the token's chunk."""
    return reference.memory_step(state, k_t, v_t, q_t, lr_t, momentum_t, decay_t, chunk_size=chunk_size,
                                 batch_size=batch_size, residual=residual, max_grad_norm=max_grad_norm)
