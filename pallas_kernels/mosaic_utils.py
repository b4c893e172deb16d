"""Glue shared by the Mosaic (TPU) chunked kernels (based/pallas_tpu.py, lightning/pallas_tpu.py).

Both kernels run on a grid (B, H, N) whose chunk axis N runs in order on one core ("arbitrary"), so a running state
can live in VMEM scratch across grid steps. Mosaic's block rule is that the last two block dims are multiples of
(8, 128) or the full array dims, so chunks are taken from a head-major [B, H, T_pad, X] copy whose last two block
dims are (C, X): X is the full dim, so any head dim tiles, and C is a multiple of 16 (8 sublanes, 16 for packed
bf16). T is zero-padded to a multiple of C; each kernel keeps the padding out of its state.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUBLANES = 16  # C must fill whole (bf16-packed) sublane tiles


def chunk(chunk_size: int) -> int:
    """The chunk the kernels run at: chunk_size rounded up to a multiple of 16 (changes only the order of float32
    sums)."""
    return -(-chunk_size // SUBLANES) * SUBLANES


def compiler_params() -> pltpu.CompilerParams:
    """(B, H) parallel, the chunk axis sequential: the state in scratch is carried across it."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def head_major(x: jax.Array, t_pad: int) -> jax.Array:
    """[B, T, H, X] -> zero-padded [B, H, T_pad, X]."""
    t = x.shape[1]
    if t != t_pad:
        x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    return x.swapaxes(1, 2)


def time_major(x: jax.Array, t: int) -> jax.Array:
    """[B, H, T_pad, X] -> [B, T, H, X]."""
    return x.swapaxes(1, 2)[:, :t]


def chunk_spec(c: int, width: int, n: int | None = None) -> pl.BlockSpec:
    """One [C, width] chunk of a [B, H, T_pad, width] array per grid step; with n given, chunks are visited in
    reverse order (step i reads chunk n - 1 - i)."""
    if n is None:
        return pl.BlockSpec((None, None, c, width), lambda b, h, i: (b, h, i, 0))
    return pl.BlockSpec((None, None, c, width), lambda b, h, i: (b, h, n - 1 - i, 0))
