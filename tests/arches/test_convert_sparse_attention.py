"""Attention checkpoint -> sparse_attention: the same weights; a pattern that lists every causal key gives the same
logits; a sparse model converts to other pattern options; the S2 hybrid keeps every dense_every-th layer dense;
`effarch convert` options are checked in one line. sparse_attention -> attention (LongLoRA's dense inference): the
same weights, the logits of infer_dense decoding, and the round trip gives back the attention config. The dynamic
patterns keep every weight (seer adds gates, hip nothing)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.convert_sparse_attention import convert_to_attention, convert_to_sparse_attention
from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.sparse_attention import SparseAttention
from tests.helpers.numerics import assert_close

V, D, T = 37, 24, 12
CFG = ModelConfig(vocab_size=V, d_model=D, n_layers=2, mixers=("attention", "base_conv"),
                  attention=AttentionConfig(n_heads=4, n_kv_heads=2))


def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T)), jnp.int32)


def load(cfg, params) -> DecoderLM:
    model = DecoderLM(cfg, rngs=nnx.Rngs(123))  # a different init: every weight must come from `params`
    nnx.update(model, params)
    return model


@pytest.mark.parametrize("pure_dict", [False, True])
def test_a_pattern_listing_every_causal_key_keeps_the_logits(pure_dict):
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(baseline, nnx.Param)
    params = nnx.to_pure_dict(params) if pure_dict else params
    cfg, new_params = convert_to_sparse_attention(CFG, params, pattern="sink_window", block_size=4, n_sink=2,
                                                  window=T)
    assert cfg.layer_mixers() == ("sparse_attention", "base_conv")
    assert (cfg.sparse_attention.n_heads, cfg.sparse_attention.n_kv_heads) == (4, 2)
    assert isinstance(new_params, dict) == pure_dict
    model = load(cfg, new_params)
    assert isinstance(model.blocks[0].mixer, SparseAttention)
    x = tokens()

    @jax.jit
    def run(base, model, x):
        _, decoded = model.prefill(model.init_state(2, T), x)
        return base(x), model(x), decoded

    expected, got, decoded = run(baseline, model, x)
    assert_close("logits", got, expected, 1e-5)
    assert_close("prefill logits", decoded, expected, 1e-5)


def test_s2_hybrid_keeps_every_second_layer_dense():
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=4, attention=AttentionConfig(n_heads=4))
    baseline = DecoderLM(cfg, rngs=nnx.Rngs(0))
    new_cfg, params = convert_to_sparse_attention(cfg, nnx.state(baseline, nnx.Param), pattern="s2", block_size=2,
                                                  local_blocks=1, vert_stride=4, dense_every=2)
    assert new_cfg.layer_mixers() == ("sparse_attention", "attention") * 2
    assert new_cfg.sparse_attention.pattern == "s2"
    model = load(new_cfg, params)
    np.testing.assert_array_equal(np.asarray(model.blocks[0].mixer.q_proj.kernel),
                                  np.asarray(baseline.blocks[0].mixer.q_proj.kernel))


def test_a_sparse_model_converts_to_another_pattern_on_the_same_weights():
    """sink_window -> sink_window without sinks and a window >= T lists every causal key: the attention logits."""
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    cfg, params = convert_to_sparse_attention(CFG, nnx.state(baseline, nnx.Param), pattern="sink_window",
                                              block_size=4, n_sink=2, window=3)
    cfg2, params2 = convert_to_sparse_attention(cfg, params, n_sink=0, window=T)
    assert cfg2.layer_mixers() == cfg.layer_mixers() and cfg2.attention == cfg.attention
    assert cfg2.sparse_attention == dataclasses.replace(cfg.sparse_attention, n_sink=0, window=T)  # the rest kept
    x = tokens()
    run = nnx.jit(lambda m, x: m(x))
    assert_close("logits", run(load(cfg2, params2), x), run(baseline, x), 1e-5)
    assert not np.allclose(run(load(cfg, params), x), run(baseline, x), atol=1e-3)  # the window of 3 differs
    with pytest.raises(ValueError, match="dense_every=2 needs attention layers"):
        convert_to_sparse_attention(cfg, params, dense_every=2)
    with pytest.raises(ValueError, match="n_sink must be >= 0, got -1"):
        convert_to_sparse_attention(cfg, params, n_sink=-1)
    cfg3, _ = convert_to_sparse_attention(cfg, params, sink_positions="cache")  # StreamingLLM's sink scoring
    assert cfg3.sparse_attention == dataclasses.replace(cfg.sparse_attention, sink_positions="cache")


def test_dynamic_patterns_keep_the_weights_and_seer_adds_fresh_gates():
    """mean_topk keeps the parameters as they are; seer's gates are new parameters (seeded), the only ones, and its
    distillation pass (dense output) gives the attention logits on the same weights; converting on to a static
    pattern drops the gates and keeps the rest."""
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(baseline, nnx.Param)
    topk_cfg, topk_params = convert_to_sparse_attention(CFG, params, pattern="mean_topk", block_size=4, top_k=3)
    seer_cfg, seer_params = convert_to_sparse_attention(CFG, params, pattern="seer", block_size=4, distill=True,
                                                        gate_dim=4, seed=3)
    assert (topk_cfg.sparse_attention.pattern, seer_cfg.sparse_attention.gate_dim) == ("mean_topk", 4)
    flat = [dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(p))[0]) for p in (params, seer_params,
                                                                                          topk_params)]
    old, new = flat[:2]
    assert flat[2].keys() == old.keys() and all(np.array_equal(flat[2][k], old[k]) for k in old)
    added = sorted(jax.tree_util.keystr(k) for k in set(new) - set(old))
    assert added == ["['blocks'][0]['mixer']['policy']['k_gate']", "['blocks'][0]['mixer']['policy']['q_gate']"]
    assert all(np.array_equal(new[k], old[k]) for k in old)
    again = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(convert_to_sparse_attention(
        CFG, params, pattern="seer", block_size=4, distill=True, gate_dim=4, seed=3)[1]))[0])
    assert all(np.array_equal(again[k], new[k]) for k in new)  # the seed decides the gates
    x = tokens()
    run = nnx.jit(lambda m, x: m(x))
    assert_close("seer distillation pass", run(load(seer_cfg, seer_params), x), run(baseline, x), 1e-5)
    back_cfg, back_params = convert_to_sparse_attention(seer_cfg, seer_params, pattern="sink_window", window=T)
    back = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(back_params))[0])
    assert back.keys() == old.keys() and all(np.array_equal(back[k], old[k]) for k in old)
    assert back_cfg.sparse_attention.pattern == "sink_window"


def test_hip_keeps_the_weights():
    """pattern=hip adds nothing (training-free); the CLI's options parse."""
    from effarch.train.convert import parse_options

    params = nnx.state(nnx.eval_shape(lambda: DecoderLM(CFG, rngs=nnx.Rngs(0))), nnx.Param)  # no compute needed
    cfg, new_params = convert_to_sparse_attention(CFG, params, pattern="hip", block_size=4, top_k=3,
                                                  hip_representative="first")
    assert (cfg.sparse_attention.pattern, cfg.sparse_attention.hip_representative) == ("hip", "first")
    old, new = (dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(p))[0]) for p in (params, new_params))
    assert new.keys() == old.keys() and all(new[k] is old[k] for k in old)  # the very leaves given
    assert parse_options("sparse_attention", ["pattern=hip", "block_size=16", "density=0.25",
                                              "hip_representative=center", "hip_query_block=1"]) == \
        dict(pattern="hip", block_size=16, density=0.25, hip_representative="center", hip_query_block=1)


@pytest.mark.slow
def test_hip_covering_every_block_keeps_the_logits():
    """With top_k covering the 3 blocks of T = 12 every row is dense causal attention: the attention model's logits."""
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(baseline, nnx.Param)
    cfg, new_params = convert_to_sparse_attention(CFG, params, pattern="hip", block_size=4, top_k=3)
    run = nnx.jit(lambda m, x: m(x))
    assert_close("hip, every block", run(load(cfg, new_params), tokens()), run(baseline, tokens()), 1e-5)


def test_bad_conversions_fail_in_one_line():
    from effarch.train.config import ConfigError
    from effarch.train.convert import parse_options

    params = nnx.state(nnx.eval_shape(lambda: DecoderLM(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    no_attention = ModelConfig(vocab_size=V, d_model=D, n_layers=1, mixers=("base_conv",))
    with pytest.raises(ValueError, match="has no 'attention' layer"):
        convert_to_sparse_attention(no_attention, params)
    with pytest.raises(ValueError, match="pattern must be one of .*got 'moe'$"):
        convert_to_sparse_attention(CFG, params, pattern="moe")
    with pytest.raises(ValueError, match="^sparse_attention.plan: pattern moa needs a plan file"):
        convert_to_sparse_attention(CFG, params, pattern="moa")
    with pytest.raises(ValueError, match="keeps every attention layer dense"):
        convert_to_sparse_attention(CFG, params, dense_every=1)
    with pytest.raises(ValueError, match=r"^sparse_attention.gate_threshold must be in \[0, 1\), got 2.0$"):
        convert_to_sparse_attention(CFG, params, pattern="seer", gate_threshold=2.0)
    with pytest.raises(ValueError, match=r"^sparse_attention.top_k must be positive, got 0$"):
        convert_to_sparse_attention(CFG, params, pattern="mean_topk", top_k=0)
    assert parse_options("sparse_attention", ["pattern=seer", "density=0.25", "distill=false", "seed=1"]) == \
        dict(pattern="seer", density=0.25, distill=False, seed=1)
    assert parse_options("sparse_attention", ["pattern=s2", "vert_stride=4", "dense_every=2"]) == \
        dict(pattern="s2", vert_stride=4, dense_every=2)
    with pytest.raises(ConfigError, match="^convert --to sparse_attention: window: expected int or None, got 'x'$"):
        parse_options("sparse_attention", ["window=x"])


def test_moa_conversion_reads_the_plan_and_keeps_the_weights(tmp_path):
    """pattern=moa with a plan whose spans cover the sequence (beta = 1) reproduces the attention model's logits;
    the config keeps the plan's absolute path and, without n_sink, the plan's n_sink; a plan for another model fails
    in one line naming the file and the key."""
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"n_sink": 3, "layers": [{"alpha": [0, 0], "beta": [1.0, 1.0]}, None]}))
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    cfg, params = convert_to_sparse_attention(CFG, nnx.state(baseline, nnx.Param), pattern="moa", block_size=4,
                                              plan=str(plan))
    assert cfg.sparse_attention.plan == str(plan.resolve()) and cfg.sparse_attention.n_sink == 3
    x = tokens()
    assert_close("moa, full spans", jax.jit(load(cfg, params))(x), jax.jit(baseline)(x), 1e-5)

    plan.write_text(json.dumps({"layers": [{"alpha": [0, 0, 0], "beta": [1, 1, 1]}, None]}))
    with pytest.raises(ValueError, match=r"^sparse_attention.plan: .*plan.json: layers\[0\].alpha has 3 heads but "
                                         r"the layer has 2 KV heads"):
        convert_to_sparse_attention(CFG, nnx.state(baseline, nnx.Param), pattern="moa", plan=str(plan))


def test_longlora_back_to_attention_gives_the_dense_inference_logits():
    """A LongLoRA model (trained sparse, inferred dense) converted to attention: its parallel logits are those of
    the sparse model's infer_dense decoding, not of its sparse parallel form, and the round trip restores the
    attention layers' config."""
    baseline = DecoderLM(CFG, rngs=nnx.Rngs(0))
    sparse_cfg, params = convert_to_sparse_attention(CFG, nnx.state(baseline, nnx.Param), pattern="longlora",
                                                     block_size=2, group_size=4, infer_dense=True)
    sparse = load(sparse_cfg, params)
    cfg, dense_params = convert_to_attention(sparse_cfg, params)
    assert (cfg.layer_mixers(), cfg.attention) == (CFG.layer_mixers(), CFG.attention)
    dense = load(cfg, dense_params)
    x = tokens()

    @jax.jit
    def run(sparse, dense, x):
        _, decoded = sparse.prefill(sparse.init_state(2, T), x)
        return sparse(x), decoded, dense(x)

    sparse_logits, decoded, got = run(sparse, dense, x)
    assert_close("dense logits", got, decoded, 1e-5)
    assert float(jnp.max(jnp.abs(got - sparse_logits))) > 1e-3  # groups of 4 < T: the sparse form differs


def test_convert_to_attention_refuses_what_it_cannot_hold():
    from effarch.train.config import ConfigError
    from effarch.train.convert import parse_options

    with pytest.raises(ConfigError, match="^convert --to attention: unknown option 'pattern'; its options are none$"):
        parse_options("attention", ["pattern=longlora"])
    params = nnx.state(nnx.eval_shape(lambda: DecoderLM(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(ValueError, match="has no 'sparse_attention' layer"):
        convert_to_attention(CFG, params)
    hybrid = ModelConfig(vocab_size=V, d_model=D, n_layers=2, mixers=("sparse_attention", "attention"),
                         attention=AttentionConfig(n_heads=2))  # sparse_attention: the default 4 heads
    with pytest.raises(ValueError, match=r"differ from its sparse ones in \['n_heads'\]"):
        convert_to_attention(hybrid, nnx.state(nnx.eval_shape(lambda: DecoderLM(hybrid, rngs=nnx.Rngs(0))),
                                               nnx.Param))


@pytest.mark.parametrize("pure_dict", [False, True])
def test_routing_conversion_keeps_every_weight_and_adds_fresh_centroids(pure_dict):
    """A dynamic pattern's policy state the source lacks (routing's k-means centroids, a trained buffer) is freshly
    initialised; converting back to attention drops it."""
    from effarch.layers.trained_state import SAVED
    from effarch.train import param_tree

    params = nnx.state(DecoderLM(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params) if pure_dict else params
    cfg, new_params = convert_to_sparse_attention(CFG, params, pattern="routing", block_size=4, routing_clusters=3,
                                                  routing_local_heads=1)
    assert (cfg.sparse_attention.pattern, cfg.sparse_attention.routing_clusters) == ("routing", 3)
    old, new = param_tree.flatten(params), param_tree.flatten(new_params)
    assert set(new) - set(old) == {"blocks/0/mixer/policy/centroids"}
    for path, value in old.items():
        np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(value))
    mu = np.asarray(new["blocks/0/mixer/policy/centroids"])
    assert mu.shape == (1, 3, 6)  # one routed KV head of two, 3 clusters, head_dim 24 / 4
    np.testing.assert_allclose(np.linalg.norm(mu, axis=-1), 1.0, rtol=1e-5)
    if not pure_dict:  # the new model's variable types, so that it merges and saves like a trained run
        model = DecoderLM(cfg, rngs=nnx.Rngs(1))
        nnx.update(model, new_params)
        np.testing.assert_array_equal(np.asarray(model.blocks[0].mixer.policy.centroids[...]), mu)
        assert set(param_tree.flatten(nnx.state(model, SAVED))) == set(new)
    back_cfg, back = convert_to_attention(cfg, new_params)
    assert back_cfg.layer_mixers()[0] == "attention" and set(param_tree.flatten(back)) == set(old)


def test_a_non_causal_run_converts_to_biformer_and_back():
    """A non-causal attention run -> biformer routing every region (T = 12: 3 regions of 4, top_k 3): the same logits;
    biformer_lce adds a fresh LCE convolution under the policy; the way back is non-causal attention. Causal runs and
    non-causal patterns (or the reverse) do not mix."""
    cfg = dataclasses.replace(CFG, mixers=("attention",),
                              attention=dataclasses.replace(CFG.attention, causal=False))
    baseline = DecoderLM(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(baseline, nnx.Param)
    sparse_cfg, sparse_params = convert_to_sparse_attention(cfg, params, pattern="biformer", block_size=4, top_k=3)
    x = tokens()
    run = nnx.jit(lambda m, x: m(x))
    expected = run(baseline, x)
    assert_close("biformer logits", run(load(sparse_cfg, sparse_params), x), expected, 1e-5)
    lce_cfg, lce_params = convert_to_sparse_attention(cfg, params, pattern="biformer", block_size=4, top_k=3,
                                                      biformer_lce=3)
    policy = nnx.to_pure_dict(lce_params)["blocks"][0]["mixer"]["policy"]
    assert set(policy) == {"lce_kernel", "lce_bias"} and policy["lce_kernel"].shape == (3, 2 * (D // 4))
    back_cfg, back_params = convert_to_attention(lce_cfg, lce_params)
    assert back_cfg.attention == cfg.attention and not back_cfg.attention.causal
    assert_close("back", run(load(back_cfg, back_params), x), expected, 1e-5)
    with pytest.raises(ValueError, match=r"^convert to sparse_attention: pattern biformer is non-causal but "
                                         r"model.attention.causal is true; non-causal patterns \['bidir_window', "):
        convert_to_sparse_attention(CFG, nnx.state(DecoderLM(CFG, rngs=nnx.Rngs(0)), nnx.Param), pattern="biformer")
    with pytest.raises(ValueError, match="pattern sink_window is causal but model.attention.causal is false"):
        convert_to_sparse_attention(cfg, params, pattern="sink_window")
    with pytest.raises(ValueError, match="pattern mean_topk is causal but the run's pattern biformer is non-causal"):
        convert_to_sparse_attention(sparse_cfg, sparse_params, pattern="mean_topk")
