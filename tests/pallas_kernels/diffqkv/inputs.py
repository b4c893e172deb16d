"""Inputs shared by the DiffQKV op tests: distinct odd sizes so a swapped axis cannot pass."""

import jax.numpy as jnp
import numpy as np

B, K, V = 2, 5, 7


def make_inputs(seed, *, T, S, Hq, Hk, Hv, dtype=jnp.float32):
    # numpy draws: no per-shape compilation of random kernels, which dominates these small tests on CPU.
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

    return normal(B, T, Hq, K), normal(B, S, Hk, K), normal(B, S, Hv, V), normal(B, T, Hq, V)
