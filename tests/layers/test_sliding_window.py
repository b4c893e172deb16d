"""SlidingWindowAttention: RoPE + the op reference, locality, the state size stops growing at window. Decoding ==
parallel (the ring buffer wrapping) and the rest of the Mixer protocol are in tests/conformance/."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.axes import Mixer
from effarch.layers.rope import apply_rope
from effarch.layers.sliding_window import SlidingWindowAttention, SlidingWindowConfig
from effarch.pallas_kernels.sliding_window import reference
from tests.helpers.numerics import assert_close
from tests.layers.test_based import jitted, make_x

D, T = 12, 23
CONFIG = SlidingWindowConfig(n_heads=3, n_kv_heads=1, window=5)


def make_layer(config=CONFIG, seed=0):
    return SlidingWindowAttention(D, config, rngs=nnx.Rngs(seed))


def test_is_a_mixer_with_gqa_projections():
    layer = make_layer()
    assert isinstance(layer, Mixer)
    assert layer.q_proj.kernel.shape == (D, 12) and layer.k_proj.kernel.shape == (D, 4)
    assert layer.v_proj.kernel.shape == (D, 4) and layer.o_proj.kernel.shape == (12, D)
    assert all(lin.bias is None for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    assert layer.k_proj.kernel.get_metadata()["logical_axes"] == ("embed", "kv_heads")


def test_call_matches_rope_plus_reference():
    layer = make_layer()
    x = make_x()

    @jax.jit
    def by_hand(x):
        pos = jnp.arange(T)
        q = apply_rope((x @ layer.q_proj.kernel[...]).reshape(2, T, 3, 4), pos)
        k = apply_rope((x @ layer.k_proj.kernel[...]).reshape(2, T, 1, 4), pos)
        v = (x @ layer.v_proj.kernel[...]).reshape(2, T, 1, 4)
        return reference.sliding_window_reference(q, k, v, window=5).reshape(2, T, D) @ layer.o_proj.kernel[...]

    y = jitted(layer, "__call__")(x)
    assert_close("call", y, by_hand(x), 1e-5)
    ref_layer = make_layer(dataclasses.replace(CONFIG, implementation="reference"))
    assert_close("implementation=reference", jitted(ref_layer, "__call__")(x), y, 1e-5)


def test_is_causal_and_local():
    layer = make_layer()
    x = make_x()
    call = jitted(layer, "__call__")
    t0 = 13
    changed = np.asarray(jnp.abs(call(x.at[:, t0].add(1.0)) - call(x)).max(axis=(0, 2))) > 0
    # Token t0 reaches exactly the outputs t0 .. t0 + window - 1.
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(t0, t0 + 5))


def test_state_size_grows_to_window_then_stays():
    layer = make_layer()
    per_token = 2 * 1 * 4 * 4  # k and v, Hkv = 1, head_dim = 4, float32
    assert [layer.state_size(n) for n in (1, 4, 5, 6, 100, 10**6)] == [per_token * n for n in (1, 4, 5, 5, 5, 5)]
    for max_len in (8, 4096):
        state = layer.init_state(2, max_len)
        assert state.k.shape == (2, 5, 1, 4)
        # Two sequences' k and v, plus the shared int32 counter.
        assert sum(leaf.nbytes for leaf in jax.tree.leaves(state)) == 2 * layer.state_size(max_len) + 4


def test_config_validation():
    for field, value in (("n_heads", 0), ("n_kv_heads", 2), ("window", 0), ("rope_theta", 0.0)):
        with pytest.raises(ValueError, match=field):
            SlidingWindowConfig(**{"n_heads": 3, field: value})
    with pytest.raises(ValueError, match="even head dim"):
        SlidingWindowAttention(9, CONFIG, rngs=nnx.Rngs(0))
