"""`effarch heads`: the retrieval score on hand-built attention maps (a copy head scores 1, a uniform head 0), the
probe policy's top-1 positions and masking against hand computations, the mask-top plumbing, one-line CLI errors, and
(slow) the whole command on a tiny passkey run: the JSON schema that `razor` reads and the heatmap."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.kv_policies import ProbePolicy, make_policy
from effarch.train import heads
from effarch.train.data import niah, passkey
from tests.helpers.cli import cli, one_error_line
from tests.helpers.runs import ROOT


def test_copy_head_scores_one_and_uniform_head_zero():
    # Prompt: filler 9s, the needle 3 1 4 at positions 4..6; the generated answer is 3 1 4 (3 steps).
    tokens = np.array([9, 9, 9, 9, 3, 1, 4, 9, 9, 8])
    span, gen = (4, 7), np.array([3, 1, 4])
    S = len(tokens)
    copy = np.zeros((3, S))
    copy[[0, 1, 2], [4, 5, 6]] = 1.0  # attends to the token it writes, inside the needle
    uniform = np.full((3, S), 1.0 / S)  # top-1 of a uniform row: position 0, outside the needle
    wrong = np.zeros((3, S))
    wrong[[0, 1, 2], [5, 6, 4]] = 1.0  # inside the needle, but not the token written
    half = copy.copy()
    half[1] = uniform[1]
    maps = np.stack([copy, uniform, wrong, half], axis=-2)  # [steps, heads, S]
    np.testing.assert_allclose(heads.retrieval_hits(maps.argmax(-1), gen, tokens, span), [1, 0, 0, 2 / 3])


def test_needle_spans_recall_and_ranking():
    x, y, _ = passkey.passkey_batch(np.random.default_rng(0), 1, 48, depths=np.array([0.5]))
    (trial,) = heads.trials_of(x, y)
    s, e = trial["span"]
    assert x[0, s - 1] == passkey.PK_OPEN and x[0, e] == passkey.PK_CLOSE and e - s == passkey.KEY_LEN
    assert trial["prompt"][-1] == passkey.PK_OPEN and len(trial["prompt"]) == 48 - passkey.KEY_LEN
    x, y = niah.niah_batch(np.random.default_rng(0), 1, 60, depths=np.array([0.3]))
    (trial,) = heads.trials_of(x, y)
    s, e = trial["span"]
    assert x[0, s - 1] == niah.VAL and x[0, s - 4] == niah.KEY and e - s == niah.VALUE_LEN
    assert heads.rouge1_recall([1, 2, 2], [2, 2, 3]) == pytest.approx(2 / 3)
    ranking = heads.head_ranking([[0.1, 0.5], None, [0.5, 0.0]])
    assert [(r["layer"], r["head"]) for r in ranking] == [(0, 1), (2, 0), (0, 0), (2, 1)]


def test_probe_top_and_masks_by_hand():
    rng = np.random.default_rng(1)
    B, S, Hkv, Hq, D, length = 2, 10, 2, 4, 8, 7
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    kk, vv = np.repeat(np.asarray(k), 2, axis=2)[:, :length], np.repeat(np.asarray(v), 2, axis=2)[:, :length]
    s = np.einsum("bhd,bshd->bhs", np.asarray(q), kk) / np.sqrt(D)
    full = np.einsum("bhs,bshd->bhd", np.asarray(jax.nn.softmax(s, -1)), vv)
    p = ProbePolicy().for_layer(0)
    o, state, reads = jax.jit(p.attend)(p.init_state(B, S, Hkv, D, n_heads=Hq), q, k, v, jnp.int32(length))
    np.testing.assert_allclose(o, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state["top"], s.argmax(-1))
    assert float(reads) == length
    masked = ProbePolicy(masked=((0, 1), (1, 2)), mask_mode="uniform").for_layer(0)  # (1, 2): another layer
    o, _, _ = jax.jit(masked.attend)(masked.init_state(B, S, Hkv, D, n_heads=Hq), q, k, v, jnp.int32(length))
    np.testing.assert_allclose(o[:, 1], vv[:, :, 1].mean(1), rtol=1e-5)  # uniform over the 7 visible keys
    np.testing.assert_allclose(o[:, [0, 2, 3]], full[:, [0, 2, 3]], rtol=1e-5, atol=1e-6)
    zero = ProbePolicy(masked=((0, 3),), mask_mode="zero").for_layer(0)
    o, _, _ = jax.jit(zero.attend)(zero.init_state(B, S, Hkv, D, n_heads=Hq), q, k, v, jnp.int32(length))
    assert float(jnp.abs(o[:, 3]).max()) == 0.0


def tiny_model(n_layers=1):
    cfg = ModelConfig(vocab_size=passkey.VOCAB_SIZE, d_model=16, n_layers=n_layers,
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2))
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_mask_top_plumbing():
    model = tiny_model()
    x, y, _ = passkey.passkey_batch(np.random.default_rng(0), 2, 32)
    trials = heads.trials_of(x, y)
    ranking = heads.head_ranking([[0.1, 0.9, 0.0, 0.2]])
    args = heads.parser().parse_args(["run", "--mask-top", "50", "--mask-seeds", "1", "--batch-size", "2"])
    out = heads.mask_test(model, trials, ranking, args)
    assert out["count"] == 2 and out["top"]["heads"] == [[0, 1], [0, 3]]
    (rnd,) = out["random"]
    assert sorted(map(tuple, rnd["heads"])) == [(0, 0), (0, 2)]  # the two heads outside the top
    assert 0 <= out["top"]["accuracy"] <= 1 and out["random_mean"] == rnd["accuracy"]
    # The masked run really masks: the last probe policy given to the model names the random heads.
    assert model.kv_policy.masked == ((0, 0), (0, 2))


def test_unsupported_mixer_is_one_line():
    swa = DecoderLM(ModelConfig(vocab_size=32, d_model=16, n_layers=1, mixers=("sliding_window",)), rngs=nnx.Rngs(0))
    with pytest.raises(heads.HeadsError, match="kv policy probe: no layer .* \\(mixers sliding_window\\)"):
        heads.with_probe(swa)


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "heads", tmp_path / "nope")
    assert code == 2 and "run dir" in one_error_line(err) and "does not exist" in err
    code, _, err = cli(capsys, "heads", tmp_path, "--mask-top", "150")
    assert code == 2 and "--mask-top is a percentage in (0, 100], got 150" in one_error_line(err)
    code, _, err = cli(capsys, "heads", tmp_path, "--task", "mqar")
    assert code == 2 and "argument --task: invalid choice" in one_error_line(err)
    code, _, err = cli(capsys, "heads", tmp_path)
    assert code == 2 and "has no config.yaml" in one_error_line(err)


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    from effarch.train.config import load_config
    from effarch.train.train import train_and_evaluate

    run = tmp_path_factory.mktemp("heads") / "run"
    train_and_evaluate(load_config([ROOT / "configs" / "passkey" / "attention_moa.yaml",
                                    ROOT / "configs" / "overlays" / "tiny.yaml"],
                                   [f"train.run_dir={run}", "train.async_checkpoint=false", "data.seq_len=64",
                                    "data.passkey.examples=64", "model.vocab_size=19"]))
    return run


@pytest.mark.slow
def test_heads_command_writes_the_schema_razor_reads(passkey_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "heads", passkey_run, "--lengths", "40", "--depths", "0.5", "--trials", "2",
                            "--mask-top", "25", "--mask-seeds", "2", "--out", out)
    assert code == 0, err
    assert "| layer | h0 | h1 | h2 | h3 |" in stdout and "top heads:" in stdout and "mask (uniform) top 25%" in stdout
    result = json.loads((out / "passkey.json").read_text())
    assert (out / "passkey.png").is_file() and not (passkey_run / "heads").exists()
    assert result["n_layers"] == 2 and result["layers"] == [0, 1] and result["n_heads"] == [4, 4]
    assert result["n_kv_heads"] == [4, 4] and result["trials"]["total"] == 2
    assert [len(row) for row in result["scores"]] == [4, 4]
    assert all(0 <= s <= 1 for row in result["scores"] for s in row)
    assert len(result["ranking"]) == 8 and result["ranking"][0]["score"] == max(max(r) for r in result["scores"])
    mask = result["mask"]
    assert mask["count"] == 2 and len(mask["random"]) == 2 and mask["mode"] == "uniform"
    # razor reads the file, for the run's own model
    from effarch.train.generate import load_model

    model = load_model(passkey_run)
    assert model.set_kv_policy(make_policy("razor", [f"heads={out / 'passkey.json'}", "top=2", "budget=16"])) == [0, 1]
