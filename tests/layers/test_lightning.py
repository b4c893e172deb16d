"""LightningAttention (TNL token mixer) invariants and the SGLU / SRMSNorm pieces."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.axes import Mixer
from effarch.layers.lightning import SGLU, LightningAttention, LightningConfig, srms_norm
from effarch.pallas_kernels.lightning import tnl_decay
from tests.helpers.numerics import assert_close

D, H, T = 15, 3, 37  # head_dim 5


def _inputs(t_len=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((2, t_len, D)), jnp.float32)


def _layer(output_gate="low_rank"):
    config = LightningConfig(n_heads=H, block_size=16, output_gate=output_gate)
    # Layer 1 of 3: decays 0.5·slope, strong enough to matter over 37 tokens.
    return LightningAttention(D, config, layer_idx=1, n_layers=3, rngs=nnx.Rngs(0))


@pytest.fixture
def layer():
    return _layer()


def test_is_a_mixer_with_fixed_decay(layer):
    assert isinstance(layer, Mixer)
    np.testing.assert_allclose(layer.decay(), tnl_decay(H, 1, 3))
    # The decay is not a parameter: nothing the optimiser sees has H entries.
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert all(p.shape != (H,) for p in params)


# The default low_rank gate decodes in tests/conformance/; here the linear one.
@pytest.mark.parametrize("output_gate", ["linear"])
def test_prefill_then_decode_equals_parallel(output_gate):
    layer = _layer(output_gate)
    x = _inputs()
    y = layer(x)
    p = 23
    state, y_prefill = layer.prefill(layer.init_state(2, T), x[:, :p])
    steps = []
    for t in range(p, T):
        state, y_t = layer.decode_step(state, x[:, t])
        steps.append(y_t)
    assert_close("prefill", y_prefill, y[:, :p], rtol=1e-5)
    assert_close("decode", jnp.stack(steps, axis=1), y[:, p:], rtol=1e-5)


def test_state_size_is_constant(layer):
    assert layer.state_size(1) == layer.state_size(10_000) == H * 5 * 5 * 4
    state = layer.init_state(2, 10_000)
    assert state.shape == (2, H, 5, 5) and state.dtype == jnp.float32
    assert state.nbytes == 2 * layer.state_size(10_000)


def test_grad_through_layer_matches_reference_path(layer):
    x = _inputs(seed=3)
    reference_layer = nnx.clone(layer)
    reference_layer.config = dataclasses.replace(layer.config, implementation="reference")

    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    # Jitted: eager autodiff of the layer compiles op by op, seconds of the CPU test budget.
    grad_fn = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    grads, grads_ref = grad_fn(layer, x), grad_fn(reference_layer, x)
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref) > 1
    for i, (g, g_ref) in enumerate(zip(flat, flat_ref)):
        assert jnp.any(g != 0), f"grad {i} is zero"
        assert_close(f"grad {i}", g, g_ref, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="output_gate"):
        LightningConfig(output_gate="swish")
    with pytest.raises(ValueError, match="n_heads"):
        LightningAttention(16, LightningConfig(n_heads=3), layer_idx=0, n_layers=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layer_idx"):
        LightningAttention(15, LightningConfig(n_heads=3), layer_idx=2, n_layers=2, rngs=nnx.Rngs(0))


def test_srms_norm_known_answer():
    # ‖[3, 4]‖₂ / √2 = 5/√2, so the output is [3, 4]·√2/5.
    np.testing.assert_allclose(srms_norm(jnp.array([3.0, 4.0]), eps=0.0), [0.6 * 2**0.5, 0.8 * 2**0.5], rtol=1e-6)


def test_sglu_has_no_activation():
    sglu = SGLU(D, 11, rngs=nnx.Rngs(0))
    x = _inputs(t_len=5)
    y = sglu(x)
    expected = (x @ sglu.v_proj.kernel[...] * (x @ sglu.u_proj.kernel[...])) @ sglu.out_proj.kernel[...]
    assert_close("sglu", y, expected, rtol=1e-6)
    # A bilinear map without an activation is homogeneous of degree 2 (a SiLU would break this).
    assert_close("degree 2", sglu(-3.0 * x), 9.0 * y, rtol=1e-5)
