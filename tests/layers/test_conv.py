"""Short causal convolution mixers: decoding keeps the state's dtype; the conv's hand-written VJP equals autodiff's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.conv import BaseConv, ConvConfig, ZoologyBaseConv, causal_conv


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


def _conv_by_formula(history, x, w):
    padded = jnp.concatenate([history, x], axis=1)
    return sum(padded[:, i : i + x.shape[1]] * w[i][None, None] for i in range(w.shape[0]))


@pytest.mark.parametrize("k,T", [(4, 13), (3, 1), (1, 5), pytest.param(4, 2, marks=pytest.mark.slow),
                                 pytest.param(2, 7, marks=pytest.mark.slow)])
def test_causal_conv_vjp_equals_autodiff(k, T):
    """Values and the gradients w.r.t. history, x and the taps, including T < k - 1 (history rows reaching past x)."""
    kh, kx, kw, kc = jax.random.split(jax.random.key(k * 100 + T), 4)
    history = jax.random.normal(kh, (2, k - 1, 5))
    x, ct = jax.random.normal(kx, (2, T, 5)), jax.random.normal(kc, (2, T, 5))
    w = jax.random.normal(kw, (k, 5))

    def loss(f):
        return lambda *a: jnp.sum(f(*a) * ct)

    got = jax.value_and_grad(loss(causal_conv), argnums=(0, 1, 2))(history, x, w)
    want = jax.value_and_grad(loss(_conv_by_formula), argnums=(0, 1, 2))(history, x, w)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
