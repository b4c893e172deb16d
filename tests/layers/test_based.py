"""BasedLinearAttention: the op reference, projections, state size known answers, config. The Mixer protocol
(decoding == parallel, causality, gradients, state bytes) is in tests/conformance/."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.axes import Mixer
from effarch.layers.based import BasedConfig, BasedLinearAttention
from effarch.pallas_kernels.based import reference
from tests.helpers.numerics import assert_close

D, T = 12, 23
CONFIG = BasedConfig(feature_dim=5, n_heads=3, chunk_size=8)


def make_layer(config=CONFIG, seed=0):
    return BasedLinearAttention(D, config, rngs=nnx.Rngs(seed))


def make_x(seed=1, batch=2, length=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, D), np.float32))


def jitted(layer, method):
    """jax.jit over (params, *args) of `layer.method`: the layer stays a plain pytree."""
    graphdef, params = nnx.split(layer)
    fn = jax.jit(lambda params, *args: getattr(nnx.merge(graphdef, params), method)(*args))
    return lambda *args: fn(params, *args)


def test_is_a_mixer_with_the_spec_projections():
    layer = make_layer()
    assert isinstance(layer, Mixer)
    # q_proj, k_proj: D -> H F; v_proj: D -> H head_dim (head_dim = D / H); out_proj back to D; no biases.
    assert layer.q_proj.kernel.shape == (D, 15) and layer.k_proj.kernel.shape == (D, 15)
    assert layer.v_proj.kernel.shape == (D, D) and layer.out_proj.kernel.shape == (D, D)
    assert all(lin.bias is None for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj))
    assert layer.q_proj.kernel.get_metadata()["logical_axes"] == ("embed", "heads")
    assert layer.out_proj.kernel.get_metadata()["logical_axes"] == ("heads", "embed")


def test_call_matches_the_op_reference():
    layer = make_layer()
    x = make_x()
    y = jitted(layer, "__call__")(x)

    @jax.jit
    def by_hand(x):
        # Heads split as [H, F] for q, k and [H, head_dim] for v, head h of q/k paired with head h of v.
        q = x @ layer.q_proj.kernel[...]
        k = x @ layer.k_proj.kernel[...]
        v = x @ layer.v_proj.kernel[...]
        o = reference.based_quadratic(q.reshape(2, T, 3, 5), k.reshape(2, T, 3, 5), v.reshape(2, T, 3, 4), eps=1e-6)
        return o.reshape(2, T, D) @ layer.out_proj.kernel[...]

    assert_close("call", y, by_hand(x), 1e-5)
    ref_layer = make_layer(dataclasses.replace(CONFIG, implementation="reference"))
    assert_close("implementation=reference", jitted(ref_layer, "__call__")(x), y, 1e-5)


def test_state_size_is_constant_and_matches_init_state():
    layer = make_layer()
    sizes = {layer.state_size(n) for n in (1, 64, 10**6)}
    # H * (1 + F + F(F+1)/2) * (head_dim + 1) float32 = 3 * 21 * 5 * 4 bytes.
    assert sizes == {3 * 21 * 5 * 4}
    for max_len in (8, 4096):
        state = layer.init_state(2, max_len)
        assert sum(leaf.nbytes for leaf in jax.tree.leaves(state)) == 2 * layer.state_size(max_len)


def test_decode_state_has_153_features_per_head_at_f16():
    # The paper's F = 16: 1 + 16 + 136 symmetric products = 153 features per head (273 with all F^2 products).
    layer = BasedLinearAttention(D, BasedConfig(feature_dim=16, n_heads=3, chunk_size=8), rngs=nnx.Rngs(0))
    assert layer.state_size(64) == 3 * 153 * (4 + 1) * 4
    x = make_x()
    state, _ = jitted(layer, "prefill")(layer.init_state(2, T), x)
    assert state.kv.shape == (2, 3, 153, 4) and state.k.shape == (2, 3, 153)
    state, _ = jitted(layer, "decode_step")(state, x[:, 0])
    assert state.kv.shape == (2, 3, 153, 4) and state.k.shape == (2, 3, 153)


def test_config_validation():
    for field, value in (("feature_dim", 0), ("n_heads", 0), ("chunk_size", 0), ("eps", -1.0)):
        with pytest.raises(ValueError, match=field):
            BasedConfig(**{field: value})
    with pytest.raises(ValueError, match="based.n_heads=3 must divide d_model=10"):
        BasedLinearAttention(10, CONFIG, rngs=nnx.Rngs(0))


def test_prefill_uses_the_layers_implementation():
    from effarch.layers.based import BasedConfig, BasedLinearAttention

    mixer = BasedLinearAttention(16, BasedConfig(feature_dim=4, n_heads=2, implementation="nope"), rngs=nnx.Rngs(0))
    x = jnp.ones((1, 5, 16))
    with pytest.raises(ValueError, match="based_prefill: unknown implementation 'nope'"):
        mixer.prefill(mixer.init_state(1, 5), x)
