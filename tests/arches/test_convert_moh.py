"""Baseline attention checkpoint -> MoH (parameter-free router): every weight reused, logits equal with all heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.convert_moh import convert_to_moh
from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.mlp import MLPConfig
from effarch.layers.moh import MoHAttention
from tests.helpers.numerics import assert_close, rel_err

V, D, T = 37, 24, 13
CFG = ModelConfig(vocab_size=V, d_model=D, n_layers=3, mixers=("attention", "base_conv", "attention"),
                  mlp=MLPConfig("swiglu"), attention=AttentionConfig(n_heads=6, n_kv_heads=3))


@jax.jit
def forward(model, x):
    # One compiled program: eager op-by-op dispatch is most of the time of a small model on CPU.
    return model(x)


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, T)), jnp.int32)


def load(cfg, params) -> DecoderLM:
    model = DecoderLM(cfg, rngs=nnx.Rngs(123))  # a different init: every weight must come from `params`
    nnx.update(model, params)
    return model


@pytest.mark.parametrize("pure_dict", [False, True])
def test_all_heads_active_reproduces_baseline_logits(pure_dict):
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(baseline, nnx.Param)
    if pure_dict:
        params = nnx.to_pure_dict(params)
    moh_cfg, moh_params = convert_to_moh(CFG, params, n_shared=2, top_k=4)
    assert moh_cfg.layer_mixers() == ("moh", "base_conv", "moh")
    assert moh_cfg.moh.router == "parameter_free" and moh_cfg.moh.n_kv_heads == 3
    assert isinstance(moh_params, dict) == pure_dict
    model = load(moh_cfg, moh_params)
    assert isinstance(model.blocks[0].mixer, MoHAttention)
    x = tokens()
    expected = forward(baseline, x)
    assert_close("logits", forward(model, x), expected, 1e-5)
    # Decoding the converted model works from the same cache layout.
    _, logits = jax.jit(lambda m, s, x: m.prefill(s, x))(model, model.init_state(2, T), x)
    assert_close("prefill logits", logits, expected, 1e-5)


def test_default_conversion_routes_three_quarters_of_the_heads():
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    moh_cfg, moh_params = convert_to_moh(CFG, nnx.state(baseline, nnx.Param))
    assert (moh_cfg.moh.n_shared, moh_cfg.moh.top_k, moh_cfg.moh.n_active) == (3, 1, 4)
    model, x = load(moh_cfg, moh_params), tokens()
    logits = forward(model, x)
    # Fewer heads change the logits (not a no-op), but the model is the baseline's: close, finite.
    assert 1e-4 < rel_err(logits, forward(baseline, x)) < 1.0
    grads = jax.jit(jax.grad(lambda m: jnp.mean(m(x))))(model)
    q_grad = grads.blocks[0].mixer.q_proj.kernel[...]
    assert bool(jnp.all(jnp.isfinite(q_grad))) and float(jnp.max(jnp.abs(q_grad))) > 0


def test_bad_inputs_are_named():
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(baseline, nnx.Param))
    with pytest.raises(ValueError, match="no 'attention' layer"):
        convert_to_moh(ModelConfig(mixers=("base_conv",), n_layers=1), params)
    wrong = ModelConfig(vocab_size=V, d_model=D, n_layers=3, mixers=CFG.mixers, mlp=CFG.mlp,
                        attention=AttentionConfig(n_heads=6))
    with pytest.raises(ValueError, match="k_proj"):
        convert_to_moh(wrong, params)
    with pytest.raises(ValueError, match="top_k"):
        convert_to_moh(CFG, params, n_shared=2, top_k=5)
