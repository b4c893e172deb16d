"""Short causal convolution mixers: decoding keeps the state's dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.conv import BaseConv, ConvConfig, ZoologyBaseConv


@pytest.mark.parametrize("cls", [BaseConv, ZoologyBaseConv])
def test_bfloat16_decode_under_scan_keeps_the_float32_state(cls):
    mixer = cls(16, ConvConfig(kernel_size=3), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 16)).astype(jnp.bfloat16)
    state = mixer.init_state(2, 7)
    assert state.dtype == jnp.float32

    def step(state, x_t):
        return mixer.decode_step(state, x_t)

    # lax.scan requires the carry to keep its dtype: a bfloat16 history coming back would be a TypeError here.
    final, ys = jax.lax.scan(step, state, jnp.moveaxis(x, 1, 0))
    assert final.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jnp.moveaxis(ys, 0, 1), np.float32), np.asarray(mixer(x), np.float32),
                               rtol=2e-2, atol=2e-2)  # bf16 arithmetic on both sides, in a different order
