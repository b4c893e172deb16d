"""Attention LM -> DiffQKV LM conversion: exact with kept heads, mean-pooled K heads, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.convert_diffqkv import convert_attention_to_diffqkv, regroup_heads
from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.mlp import MLPConfig
from tests.helpers.numerics import assert_close, rel_err

V, D, T = 37, 24, 11
BASE = ModelConfig(
    vocab_size=V, d_model=D, n_layers=3, mixers=("attention", "base_conv", "attention"), mlp=MLPConfig("swiglu"),
    attention=AttentionConfig(n_heads=6, n_kv_heads=2),
)


def split(cfg, seed):
    return nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def converted_model(params, **heads):
    cfg, new_params = convert_attention_to_diffqkv(BASE, params, **heads)
    graphdef, _, rest = split(cfg, seed=9)
    return cfg, nnx.merge(graphdef, new_params, rest)


def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T)), jnp.int32)


def test_kept_heads_reproduce_baseline_logits_and_decoding():
    graphdef, params, rest = split(BASE, seed=0)
    baseline = nnx.merge(graphdef, params, rest)
    cfg, model = converted_model(params)
    assert cfg.mixers == ("diffqkv", "base_conv", "diffqkv") and cfg.diffqkv.n_k_heads == cfg.diffqkv.n_v_heads == 2
    x = tokens()
    assert_close("logits", model(x), baseline(x), 1e-5)
    state, logits = model.prefill(model.init_state(2, T), x[:, :T - 1])
    _, last = model.decode_step(state, x[:, T - 1])
    assert_close("decoded", jnp.concatenate([logits, last[:, None]], 1), baseline(x), 1e-5)


def test_regroup_heads_hand_case():
    w = jnp.array([[1.0, 3.0, 10.0, 30.0], [2.0, 4.0, 6.0, 8.0]])  # D = 2, four heads of dim 1
    np.testing.assert_array_equal(np.asarray(regroup_heads(w, 4, 2)), [[2.0, 20.0], [3.0, 7.0]])
    np.testing.assert_array_equal(np.asarray(regroup_heads(w, 4, 1)), [[11.0], [5.0]])
    np.testing.assert_array_equal(np.asarray(regroup_heads(w[:, :2], 2, 4)), [[1.0, 1.0, 3.0, 3.0],
                                                                             [2.0, 2.0, 4.0, 4.0]])
    with pytest.raises(ValueError, match="3 must divide 4"):
        regroup_heads(w, 4, 3)


def test_merged_k_heads_are_group_means_and_the_rest_is_reused():
    graphdef, params, rest = split(BASE, seed=0)
    cfg, model = converted_model(params, n_k_heads=1)
    assert (cfg.diffqkv.n_q_heads, cfg.diffqkv.n_k_heads, cfg.diffqkv.n_v_heads) == (6, 1, 2)
    old = nnx.to_pure_dict(params)["blocks"][0]["mixer"]
    new = model.blocks[0].mixer
    k_heads = old["k_proj"]["kernel"].reshape(D, 2, 4)
    np.testing.assert_allclose(np.asarray(new.k_proj.kernel[...]), np.asarray(k_heads.mean(axis=1)), rtol=1e-6)
    for name in ("q_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(np.asarray(getattr(new, name).kernel[...]), np.asarray(old[name]["kernel"]))
    np.testing.assert_array_equal(np.asarray(model.blocks[1].mixer.conv.weight[...]),
                                  np.asarray(nnx.to_pure_dict(params)["blocks"][1]["mixer"]["conv"]["weight"]))
    # A real change of function, but trainable: finite gradients for every parameter.
    x = tokens()
    assert rel_err(model(x), nnx.merge(graphdef, params, rest)(x)) > 1e-4
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


@pytest.mark.parametrize(
    "cfg, heads, match",
    [
        (BASE, {"n_k_heads": 3}, "n_k_heads=3 must divide or be a multiple"),
        (ModelConfig(vocab_size=V, d_model=D, mixers=("base_conv",)), {}, "no 'attention' layer"),
    ],
)
def test_bad_conversions_raise(cfg, heads, match):
    _, params, _ = split(cfg, seed=0)
    with pytest.raises(ValueError, match=match):
        convert_attention_to_diffqkv(cfg, params, **heads)
