"""Shared random inputs for the Lightning op tests: distinct odd sizes so a swapped axis cannot pass."""

import jax.numpy as jnp
import numpy as np

B, H, K, V = 2, 3, 5, 7
# Moderate rates so that the decay matters across several blocks of 16 tokens without vanishing.
DECAY = jnp.array([0.3, 0.02, 1.1], jnp.float32)


def make_inputs(t_len: int, seed: int = 0):
    """q, k, v, an initial state, and cotangents for the output and the final state.

    numpy draws them: eager jax.random would compile a sampler per new shape, seconds of the CPU test budget.
    """
    rng = np.random.default_rng(seed)
    shapes = [(B, t_len, H, K), (B, t_len, H, K), (B, t_len, H, V), (B, H, K, V), (B, t_len, H, V), (B, H, K, V)]
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
