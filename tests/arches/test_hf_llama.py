"""arches/hf_llama.py: a Hugging Face Llama imports exactly (logits of transformers on a committed fixture), and
every config.json it cannot import exactly fails with one message naming the field."""

import copy
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.hf_llama import (
    HFConfigError,
    hf_config_from_model,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
)
from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.train.hf import read_hf_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llama_tiny"  # scripts/make_llama_fixture.py


@pytest.fixture(scope="module")
def fixture():
    hf_config, tensors = read_hf_checkpoint(FIXTURE)
    return hf_config, tensors, json.loads((FIXTURE / "expected.json").read_text())


def _model(cfg: ModelConfig, tree: dict) -> DecoderLM:
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, tree))
    nnx.update(model, params)
    return model


def assert_logits_close(actual, expected):
    """float32, 1e-4 relative to the logits' scale (elementwise rtol alone is undefined near zero)."""
    expected = np.asarray(expected, np.float32)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_fixture_config_maps_to_the_llama_model(fixture):
    cfg = model_config_from_hf(fixture[0])
    a = cfg.attention
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.mlp.hidden, cfg.norm_eps) == (199, 48, 2, 100, 1e-5)
    assert (a.n_heads, a.kv_heads, a.head_dim, a.rope_theta, a.rope_scaling) == (6, 2, 8, 5000.0, "llama3")
    assert (a.rope_scaling_factor, a.rope_low_freq_factor, a.rope_high_freq_factor, a.rope_original_max_len) == (
        4.0, 1.0, 4.0, 64)
    assert not cfg.tie_embeddings and cfg.layer_mixers() == ("attention", "attention")


def test_param_tree_is_the_models(fixture):
    cfg = model_config_from_hf(fixture[0])
    tree = params_from_hf(fixture[1], cfg)
    want = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    assert jax.tree.structure(tree) == jax.tree.structure(want)
    assert jax.tree.map(np.shape, tree) == jax.tree.map(lambda x: tuple(x.shape), want)


def test_imported_logits_equal_transformers(fixture):
    hf_config, tensors, expected = fixture
    cfg = model_config_from_hf(hf_config)
    logits = _model(cfg, params_from_hf(tensors, cfg))(jnp.asarray([expected["prompt"]]))[0]
    assert_logits_close(logits, expected["logits"])


def test_fixture_is_sensitive_to_the_rope_scaling(fixture):
    # The control for the test above: the same weights without the llama3 scaling give other logits, so the
    # fixture checks the scaling (and positions past 0 reach the scaled frequencies).
    hf_config, tensors, expected = fixture
    cfg = model_config_from_hf(hf_config)
    unscaled = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, rope_scaling="none"))
    logits = _model(unscaled, params_from_hf(tensors, unscaled))(jnp.asarray([expected["prompt"]]))[0]
    assert np.abs(np.asarray(logits) - np.asarray(expected["logits"])).max() > 1e-2


def test_params_to_hf_inverts_params_from_hf(fixture):
    hf_config, tensors, _ = fixture
    cfg = model_config_from_hf(hf_config)
    back = params_to_hf(params_from_hf(tensors, cfg), cfg)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value.astype(np.float32), err_msg=name)


def test_exported_config_reads_back_as_the_same_model(fixture):
    cfg = model_config_from_hf(fixture[0])
    assert model_config_from_hf(hf_config_from_model(cfg)) == cfg  # via the transformers 4.x form
    # Without scaling the scaling parameters are unused and come back as their defaults.
    plain = dataclasses.replace(cfg.attention, rope_scaling="none", rope_scaling_factor=8.0, rope_original_max_len=8192)
    tied = dataclasses.replace(cfg, tie_embeddings=True, attention=plain)
    assert model_config_from_hf(hf_config_from_model(tied)) == tied


def _v4(hf: dict) -> dict:
    """The transformers 4.x form of a config: rope_theta + rope_scaling instead of rope_parameters."""
    hf = copy.deepcopy(hf)
    rp = hf.pop("rope_parameters")
    hf["rope_theta"] = rp.pop("rope_theta")
    hf["rope_scaling"] = rp
    return hf


def test_transformers_4_config_form_reads_the_same(fixture):
    assert model_config_from_hf(_v4(fixture[0])) == model_config_from_hf(fixture[0])


BAD_CONFIGS = {
    # (edit of the fixture's config.json, text the one-line error must contain)
    "architecture": (lambda c: c.update(architectures=["MistralForCausalLM"]), "architectures"),
    "model_type": (lambda c: c.update(model_type="gemma"), "model_type"),
    "rope_type": (lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope_parameters.rope_type"),
    "v4_rope_type": (lambda c: c.pop("rope_parameters") and c.update(rope_scaling={"type": "linear", "factor": 2.0}),
                     "rope_scaling.rope_type"),
    "attention_bias": (lambda c: c.update(attention_bias=True), "attention_bias"),
    "mlp_bias": (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    "hidden_act": (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    "kv_heads": (lambda c: c.update(num_key_value_heads=4), "num_key_value_heads"),
    "partial_rotary": (lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "quantized": (lambda c: c.update(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    "missing": (lambda c: c.pop("hidden_size"), "hidden_size"),
    "llama3_missing_factor": (lambda c: c["rope_parameters"].pop("factor"), "factor"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_unsupported_config_fails_naming_the_field(fixture, case):
    edit, field = BAD_CONFIGS[case]
    hf = copy.deepcopy(fixture[0])
    edit(hf)
    with pytest.raises(HFConfigError) as err:
        model_config_from_hf(hf)
    msg = str(err.value)
    assert msg.startswith("config.json: ") and field in msg and "\n" not in msg, msg


def test_checkpoint_tensors_are_checked(fixture):
    hf_config, tensors, _ = fixture
    cfg = model_config_from_hf(hf_config)
    with pytest.raises(HFConfigError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\]"):
        params_from_hf({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)}, cfg)
    with pytest.raises(HFConfigError, match=r"missing tensor\(s\) \['lm_head.weight'\]"):
        params_from_hf({k: v for k, v in tensors.items() if k != "lm_head.weight"}, cfg)
    bad = {**tensors, "model.norm.weight": np.ones(47, np.float32)}
    with pytest.raises(HFConfigError, match=r"model.norm.weight has shape \(47,\); config.json implies \(48,\)"):
        params_from_hf(bad, cfg)
