"""effarch moa-search (train/moa_search.py): the profiling forward is the model's, the attention influence is the
first-order loss change of masking one entry and renormalising its row (checked by finite differences in float64),
the coverage of a rule is its token set's, the MILP keeps the density budget and the plans-per-layer limit and
picks the lower-loss plan, and the command runs end to end on a tiny trained run (slow suite) and fails in one line
on bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers import sparse_patterns
from effarch.layers.attention import AttentionConfig
from effarch.layers.mlp import MLPConfig
from effarch.train import moa_search
from effarch.train.config import ConfigError
from tests.helpers.cli import cli, one_error_line
from tests.helpers.numerics import assert_close
from tests.helpers.runs import tiny_mqar_attention_run

V, D = 29, 16
ONE_LAYER = ModelConfig(vocab_size=V, d_model=D, n_layers=1, mixers=("attention",),
                        attention=AttentionConfig(n_heads=4, n_kv_heads=2))


def tokens(b=2, t=9, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def test_the_profiling_forward_is_the_model():
    """With zero probes, the written-out attention gives the model's logits (GQA, a hybrid's other layers run as
    they are), and its attention rows are causal distributions."""
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=2, mixers=("base_conv", "attention"),
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2), mlp=MLPConfig(kind="swiglu"))
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert moa_search.attention_layers(model) == [1]
    x = tokens()

    @jax.jit
    def run(x):
        h, attn = moa_search.profiled_hidden(model, x, {1: jnp.zeros((2, 4, 9, 9))})
        return model.logits(h), model(x), attn

    got, expected, attn = run(x)
    assert_close("profiled logits", got, expected, 1e-5)
    A = np.asarray(attn[1])
    np.testing.assert_allclose(A.sum(-1), 1.0, rtol=1e-6)
    assert (A[..., np.triu_indices(9, 1)[0], np.triu_indices(9, 1)[1]] == 0).all()


def test_influence_is_the_first_order_loss_change_of_masking_one_entry():
    """ΔL_ij (MoA's formula, from A and ∂L/∂A) equals the derivative, by central finite differences in float64, of
    the loss along the change of A that masking A_ij and renormalising row i makes (the loss recomputed through
    the rest of the model); row 0 (one key) is removal without renormalising."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        model = DecoderLM(ONE_LAYER, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.float64)
                                                 if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
        x = tokens(b=1, t=7)
        labels = jnp.roll(x, -1, axis=1).at[:, -1].set(-100)

        def loss(probe):
            h, attn = moa_search.profiled_hidden(model, x, {0: probe})
            logits = model.norm(h) @ model.embed.embedding[...].T  # DecoderLM.logits (tied) without float32 casts
            return moa_search.per_sample_loss(logits, labels).sum(), attn[0]

        zero = jnp.zeros((1, 4, 7, 7), jnp.float64)
        value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one compile: the FD points reuse it
        (_, A), grad = value_and_grad(zero)
        assert grad.dtype == jnp.float64
        dl = np.asarray(moa_search.influence(A, grad))
        A = np.asarray(A)

        def f(probe):
            return value_and_grad(probe)[0][0]

        t = 1e-5
        checked = 0
        for h, i, j in [(0, 1, 0), (1, 3, 3), (2, 6, 2), (3, 5, 0), (1, 6, 6), (0, 4, 1), (2, 0, 0)]:
            row = A[0, h, i].copy()
            if i:
                row[j] = 0.0
                row /= row.sum()  # masked and renormalised
            else:
                row[j] = 0.0  # the first row has one key: it is removed, not renormalised
            delta = np.zeros_like(A)
            delta[0, h, i] = row - A[0, h, i]
            fd = (float(f(zero + t * delta)) - float(f(zero - t * delta))) / (2 * t)
            np.testing.assert_allclose(dl[0, h, i, j], fd, rtol=1e-6, atol=1e-12, err_msg=f"head {h}, ({i}, {j})")
            checked += abs(fd) > 1e-6
        assert checked >= 5  # the entries chosen move the loss
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("n, block", [(12, 1), (10, 4), (17, 5)])
def test_coverage_is_the_rules_token_set(n, block):
    """covered_fraction (interval counts) == the brute-force token masks of moa_spans pooled into blocks."""
    alpha, beta = np.array([2.0, 0.0, -4.0, 30.0, 1.0]), np.array([0.0, 0.25, 0.5, 0.0, 0.0])
    span, window, sink = sparse_patterns.moa_spans(alpha, beta, n, 3)
    got = moa_search.covered_fraction(n, block, window, sink)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    nb, pad = -(-n // block), -(-n // block) * block - n
    for p in range(len(alpha)):
        shown = (j <= i) & ((i - j < window[p]) | (j < sink[p]))
        assert (shown.sum(1) == np.minimum(np.arange(n) + 1, span[p])).all()

        def pooled(m):
            return np.pad(m, ((0, pad), (0, pad))).reshape(nb, block, nb, block).sum((1, 3))

        causal = pooled(j <= i)
        expected = np.where(causal > 0, pooled(shown) / np.maximum(causal, 1), 1.0)
        np.testing.assert_allclose(got[p], expected, rtol=1e-12)


def test_candidates_follow_moas_validity_rule_and_drop_duplicates():
    plans = moa_search.candidates([64], n_sink=4)
    assert all(0 < a + b * 64 <= 64 for a, b in plans)
    spans = [int(sparse_patterns.moa_spans([a], [b], 64, 4)[0][0]) for a, b in plans]
    assert len(set(spans)) == len(spans) == 8  # 8, 16, ..., 64 tokens, each once
    assert (0.0, 0.25) in plans and (16.0, 0.0) not in plans  # ties: the smallest |alpha| stays
    two = moa_search.candidates([32, 64], n_sink=4)
    assert all(a + b * n <= n for a, b in two for n in (32, 64)) and all(a + b * 32 > 0 for a, b in two)
    assert len(two) > len(plans)  # two lengths tell (0, 0.25) from (16, 0) apart


def test_the_milp_keeps_the_budget_and_picks_the_lower_loss_plan():
    density = np.array([[0.25, 0.5, 1.0]])
    loss = np.array([[[[10.0, 1.0, 0.0], [1.0, 0.5, 0.0]]]])  # [1 length, 1 layer, 2 heads, 3 candidates]
    # Mean density <= 0.375: one head at 0.5, the other at 0.25. Head 0 gains more from the wider span.
    np.testing.assert_array_equal(moa_search.solve(loss, density, 0.375), [[1, 0]])
    np.testing.assert_array_equal(moa_search.solve(loss, density, 1.0), [[2, 2]])
    np.testing.assert_array_equal(moa_search.solve(loss, density, 0.25), [[0, 0]])
    with pytest.raises(ConfigError, match="^--density 0.2: no plan meets it"):
        moa_search.solve(loss, density, 0.2)
    # Two lengths: the budget holds at each (candidate 1 is dense at the second length).
    density2 = np.array([[0.25, 0.5, 1.0], [0.25, 1.0, 0.5]])
    loss2 = np.concatenate([loss, loss])
    np.testing.assert_array_equal(moa_search.solve(loss2, density2, 0.375), [[0, 0]])


def test_the_milp_uses_at_most_two_plans_per_layer():
    """Three heads each best with their own candidate: the limit makes one of them share another's."""
    loss = np.array([[[[0.0, 5.0, 5.0], [5.0, 0.0, 5.0], [5.0, 5.0, 0.0]],
                      [[0.0, 5.0, 5.0], [5.0, 0.0, 5.0], [5.0, 5.0, 0.0]]]])  # [1, 2 layers, 3 heads, 3]
    density = np.full((1, 3), 0.5)
    free = moa_search.solve(loss, density, 1.0, max_plans_per_layer=3)
    np.testing.assert_array_equal(free, [[0, 1, 2], [0, 1, 2]])
    limited = moa_search.solve(loss, density, 1.0)
    assert all(len(set(row)) <= 2 for row in limited.tolist())
    assert loss[0, [[0], [1]], [[0, 1, 2]], limited].sum() == 10.0  # one head per layer off its best


def test_moa_search_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for argv, message in [
        (["moa-search", tmp_path, "--density", "0.25", "--out", tmp_path / "p.json"], "has no config.yaml"),
        (["moa-search", tmp_path, "--density", "0", "--out", tmp_path / "p.json"], "--density must be in (0, 1]"),
        (["moa-search", tmp_path, "--density", "0.5", "--out", tmp_path / "p.json", "--n-sink", "-1"],
         "--n-sink must be >= 0"),
    ]:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in one_error_line(err, alone=True), err
    assert not (tmp_path / "p.json").exists()


# End to end: a tiny MQAR run trained a few steps (a hybrid: the conv layer gets no rule), searched, converted and
# evaluated (~30 s on 2 cores): the slow suite.
@pytest.mark.slow
def test_moa_search_end_to_end_on_a_tiny_run(tmp_path, capsys):
    from effarch.train.generate import load_model

    run = tiny_mqar_attention_run(tmp_path / "run", steps=4)
    plan_path = tmp_path / "plan.json"
    code, out, err = cli(capsys, "moa-search", run, "--density", "0.5", "--out", plan_path, "--block", "4",
                         "--calibration-batches", "2", "--lengths", "16", "32")
    assert code == 0, err
    assert "moa plan for" in out and str(plan_path) in out
    plan = json.loads(plan_path.read_text())
    assert plan["layers"][0] is None and len(plan["layers"]) == 2
    assert len(plan["layers"][1]["alpha"]) == 2  # per KV head
    assert plan["lengths"] == [16, 32] and all(d <= 0.5 for d in plan["plan_density"].values())
    assert plan["source_run"] == str(run) and plan["checkpoint_step"] == 4

    code, _, err = cli(capsys, "convert", run, tmp_path / "moa", "--to", "sparse_attention", "pattern=moa",
                       f"plan={plan_path}", "block_size=4")
    assert code == 0, err
    model = load_model(tmp_path / "moa")
    mixer = model.blocks[1].mixer
    assert mixer.sparse.pattern == "moa" and mixer.sparse.n_sink == plan["n_sink"]
    assert list(mixer.moa_alpha) == plan["layers"][1]["alpha"]
    code, _, err = cli(capsys, "eval", tmp_path / "moa", "perplexity", "--max-examples", "16")
    assert code == 0, err

    code, _, err = cli(capsys, "moa-search", run, "--density", "0.01", "--out", tmp_path / "none.json",
                       "--block", "4", "--calibration-batches", "1")
    assert code == 2 and "--density 0.01: no plan meets it" in one_error_line(err)
    code, _, err = cli(capsys, "moa-search", run, "--density", "0.5", "--out", tmp_path / "none.json",
                       "--lengths", "4096")
    assert code == 2 and "--lengths [4096]: each must be at most 32, the length of the run's" in one_error_line(err)
