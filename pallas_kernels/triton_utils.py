"""Glue shared by the Triton (GPU) chunked kernels (based/pallas_gpu.py, lightning/pallas_gpu.py).

Both kernels run one program per (batch, head) on a grid (B, H) and walk the chunks of the whole (padded) sequence
in a `lax.fori_loop`, carrying the state in registers: the programs of a GPU grid run in parallel and in no order,
so state is never carried across programs. q, k, v stay in their [B, T, H, X] layout. Triton's rule is that every
load, store and value is a power-of-2-sized array and `tl.dot` needs each side ≥ 16, so the kernels run each
dimension at `tile(n)` and zero-pad to it; each kernel makes its padding exact.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_DIM = 16  # tl.dot's smallest operand side


def tile(n: int) -> int:
    """The size Triton runs a dimension of size n at: the power of 2 ≥ max(n, 16)."""
    return max(MIN_DIM, 1 << (n - 1).bit_length())


def compiler_params() -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def pad(x: jax.Array, t_pad: int, width: int) -> jax.Array:
    """[B, T, H, X] zero-padded to [B, t_pad, H, width]."""
    t, x_dim = x.shape[1], x.shape[-1]
    if (t, x_dim) == (t_pad, width):
        return x
    return jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, width - x_dim)))


def time_spec(t_pad: int, width: int) -> pl.BlockSpec:
    """The whole (padded) sequence of one (batch, head): the kernel slices chunks out of it with pl.ds."""
    return pl.BlockSpec((None, t_pad, None, width), lambda b, h: (b, 0, h, 0))
