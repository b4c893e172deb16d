"""The evaluation suite (train/evals/): `effarch eval` on a tiny trained MQAR run, known answers, bad input,
`effarch sweep` on a 2-config toy sweep (table, PNG, resume, skip when finished) and `effarch report`."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.train.config import dump_config, load_config
from effarch.train.data import Segment
from effarch.train.data import mqar as mqar_data
from effarch.train.evals import common, mqar, perplexity
from effarch.train.evals import niah as niah_eval
from effarch.train.main import main
from tests.helpers.cli import cli

ROOT = Path(__file__).resolve().parents[2]
# Zoology's attention model shrunk (configs/overlays/tiny.yaml) to d_model 32 and vocabulary 64 (chance 2/64) on
# (32, 4) MQAR: lr 1e-2 reaches ~0.99 in 100 steps, lr 1e-4 learns nothing in that time.
SWEEP = """
runs:
  attention: {configs: [%(root)s/configs/mqar/zoology_attention.yaml]}
configs: [%(root)s/configs/overlays/tiny.yaml]
overrides:
  model.vocab_size: 64
  data.mqar.train_segments: [[32, 4, 2000]]
  data.mqar.test_segments: [[32, 4, 200]]
  train.steps: 100
  train.batch_size: 32
  train.eval_every: 100
  train.checkpoint_every: 50
  train.log_every: 10
  train.async_checkpoint: false
grid:
  optim.lr: [1.0e-2, 1.0e-4]
evals:
  mqar: {segments: [[32, 4], [32, 8]], examples: 100, batch_size: 100}
  perplexity: {}
select: {metric: mqar.accuracy, over: [optim.lr]}
"""
CHANCE = 2 / 64
HAS_PLOTS = importlib.util.find_spec("matplotlib") is not None  # the optional `plots` extra


def metric_steps(run_dir) -> list[int]:
    return [r["step"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def main_code(argv) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    """The 2-config toy sweep, run in-process (--jobs 1)."""
    root = tmp_path_factory.mktemp("sweep")
    path = root / "toy.yaml"
    path.write_text(SWEEP % {"root": ROOT})
    sweep_dir = root / "out"
    assert main_code(["sweep", str(path), "--sweep-dir", str(sweep_dir), "--jobs", "1"]) == 0
    return {"path": path, "dir": sweep_dir, "trained": sweep_dir / "attention-lr=0.01",
            "slow": sweep_dir / "attention-lr=0.0001"}


@pytest.fixture(scope="module")
def trained_run(toy_sweep):
    return toy_sweep["trained"]



def test_mqar_eval_trained_beats_chance_untrained_does_not(trained_run):
    result = json.loads((trained_run / "eval" / "mqar.json").read_text())  # written by the sweep's eval
    assert result["task"] == "mqar" and result["chance"] == CHANCE
    assert result["checkpoint_step"] == 100 == max(metric_steps(trained_run))
    seg = result["results"]["N32_D4"]
    assert seg["queries"] == 100 * 4 and seg["state_bytes"] > 0
    assert seg["accuracy"] > 0.9 > 20 * CHANCE  # the trained length
    assert result["summary"]["N32_D8"] > 10 * CHANCE  # twice the pairs it was trained on: still far above chance
    # The same architecture untrained: at or below chance.
    cfg = load_config([trained_run / "config.yaml"])
    untrained = mqar.evaluate(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), [(32, 4)], examples=100, seed=1000,
                              batch_size=100)
    assert untrained["summary"]["accuracy"] <= 2 * CHANCE


def test_perplexity_is_the_trainers_heldout_loss(trained_run):
    result = json.loads((trained_run / "eval" / "perplexity.json").read_text())
    last_eval = [r for r in map(json.loads, (trained_run / "metrics.jsonl").read_text().splitlines())
                 if "eval/accuracy" in r][-1]
    assert last_eval["step"] == result["checkpoint_step"] == 100
    s = result["summary"]
    # The same held-out examples and the same weights as the trainer's last evaluation.
    assert s["loss"] == pytest.approx(last_eval["eval/mqar_N32_D4/loss"], rel=1e-5)
    assert s["perplexity"] == pytest.approx(math.exp(s["loss"]))
    assert s["bits_per_token"] == pytest.approx(s["loss"] / math.log(2))
    assert "bits_per_byte" not in s and s["tokens"] == 200 * 4  # MQAR tokens are not bytes


def test_sweep_selects_the_best_lr_and_plots(toy_sweep):
    sweep_dir = toy_sweep["dir"]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["attention-lr=0.01", "attention-lr=0.0001"]
    assert all(r["finished"] and r["step"] == 100 for r in summary["runs"])
    (best,) = summary["best"]  # one group (one run, one d_model): the best of the lr grid
    assert best["grid"] == {"optim.lr": 0.01} and best["metric"] > 0.9
    table = (sweep_dir / "table.md").read_text()
    assert "| attention | 0.01 | " in table and "| attention-lr=0.0001 | 0.0" in table
    if HAS_PLOTS:
        assert (sweep_dir / "mqar_accuracy_vs_state.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["png"] == "mqar_accuracy_vs_state.png"
    else:
        assert summary["png"] is None and "matplotlib is not installed" in summary["png_skipped"]
    # --collect rewrites the summary from the finished runs and runs nothing.
    (sweep_dir / "table.md").unlink()
    assert main_code(["sweep", str(toy_sweep["path"]), "--sweep-dir", str(sweep_dir), "--collect"]) == 0
    assert (sweep_dir / "table.md").read_text() == table


def test_sweep_resumes_an_interrupted_run_and_skips_finished_ones(toy_sweep, capsys):
    sweep_dir, slow = toy_sweep["dir"], toy_sweep["slow"]
    # What a SIGKILL between steps 50 and 100 leaves: checkpoints up to 50, metrics up to 50, no markers.
    shutil.rmtree(slow / "checkpoints" / "100")
    for marker in ("sweep_done.json", "sweep_trained.json"):
        (slow / marker).unlink()
    lines = (slow / "metrics.jsonl").read_text().splitlines()
    (slow / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= 50))
    finished = {p: p.stat().st_mtime_ns for p in toy_sweep["trained"].rglob("*") if p.is_file()}
    capsys.readouterr()
    argv = ["sweep", str(toy_sweep["path"]), "--sweep-dir", str(sweep_dir), "--jobs", "1"]
    assert main_code(argv) == 0
    err = capsys.readouterr().err
    assert "attention-lr=0.01: finished earlier, skipped" in err and "[1/1] attention-lr=0.0001: done" in err
    assert metric_steps(slow) == list(range(10, 110, 10))  # resumed at 50: every step trained exactly once
    assert "resumed from" in (slow / "sweep.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the finished run was not touched
    # Now both are finished: a rerun trains and evaluates nothing.
    everything = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file() and p.parent != sweep_dir}
    assert main_code(argv) == 0
    out = capsys.readouterr()
    assert out.err.count("finished earlier, skipped") == 2 and "| attention | 0.01 | " in out.out
    assert {p: p.stat().st_mtime_ns for p in everything} == everything


def test_report_prints_the_sweep_and_run_tables(toy_sweep, capsys):
    assert main_code(["report", str(toy_sweep["dir"])]) == 0
    out = capsys.readouterr().out
    assert "## sweep: best of optim.lr by mqar.accuracy (max)" in out
    assert "## mqar" in out and "## perplexity" in out
    assert "| attention-lr=0.01 | 100 | " in out and "| attention-lr=0.0001 | 100 | " in out
    assert main_code(["report", str(toy_sweep["trained"])]) == 0  # a single run directory
    assert "| . | 100 | " in capsys.readouterr().out


def test_sweep_reports_a_failed_run_and_exits_1(tmp_path, capsys):
    path = tmp_path / "fail.yaml"
    # 3 heads do not divide d_model 32: the config loads, the trainer's check refuses it before anything trains.
    three_heads = "  model.vocab_size: 64\n  model.attention.n_heads: 3\n"
    path.write_text((SWEEP % {"root": ROOT}).replace("  model.vocab_size: 64\n", three_heads))
    assert main_code(["sweep", str(path), "--sweep-dir", str(tmp_path / "out"), "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("failed (rc 2)") == 2
    log = (tmp_path / "out" / "attention-lr=0.01" / "sweep.log").read_text()
    assert "effarch: error: " in log and "n_heads" in log
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert summary["best"] == [] and not any(r["finished"] for r in summary["runs"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    from effarch.train.evals.sweep import load_sweep

    sweep = load_sweep(path)  # every run's config loads, every eval's options parse
    assert sweep.metric and sweep.evals
    if path.name == "mqar_zoology.yaml":
        assert {"attention", "based", "lightning"} <= set(sweep.runs) and sweep.grid["model.d_model"] == [64, 128]
        assert sweep.evals["mqar"] == [] and sweep.over == ("optim.lr",)  # Zoology's test segments, best lr
        # Its training data is Zoology's standard mixture, written out.
        (spec, *_) = sweep.runs_to_do()
        data = load_config(spec["configs"], spec["overrides"]).data
        assert data.mqar.train_segments == mqar_data.TRAIN_SEGMENTS and data.seed == 0


def test_sweep_and_report_bad_input_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("runs: {a: {configs: [nope.yaml]}}", "runs.a.configs[0]: config file 'nope.yaml' does not exist"),
        ("runs: {a: {}}\nsweeps: 1", "unknown key(s) ['sweeps']"),
        ("runs: {a: {}}\nevals: {mqar: {segmentz: 3}}", "evals.mqar: "),
        ("runs: {a: {}}\nevals: {mqar: {}}\nselect: {metric: niah.accuracy}", "select.metric"),
        ("runs: {a: {overrides: {model.d_model: -1}}}", "run a: model: d_model must be positive"),
    ]:
        bad.write_text(text)
        assert main_code(["sweep", str(bad), "--sweep-dir", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert main_code(["report", str(tmp_path / "missing")]) == 2
    assert main_code(["report", str(tmp_path)]) == 2
    assert "no eval results" in capsys.readouterr().err


def byte_model_and_batch():
    """A 1-layer byte-level model and 5 rows of 13 tokens, about a third of the positions labelled (the two tests
    below share the shapes, so the second reuses the first's compilation)."""
    model = DecoderLM(ModelConfig(vocab_size=256, d_model=8, n_layers=1, mixers=("attention",)), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 13))
    y = np.where(rng.random((5, 13)) < 0.3, rng.integers(0, 256, (5, 13)), -100)
    return model, x, y


def test_labelled_outputs_equal_the_full_forward():
    model, x, y = byte_model_and_batch()
    pred, ce = common.labelled_outputs(model, x, y, batch_size=2)  # 3 batches, the last padded
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jax.numpy.asarray(x)))
    rows, cols = np.nonzero(y != -100)
    np.testing.assert_array_equal(pred, logits[rows, cols].argmax(-1))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(ce, -logp[rows, cols, y[rows, cols]], rtol=1e-5, atol=1e-6)


def test_perplexity_of_a_uniform_byte_model_is_8_bits_per_byte():
    model, x, y = byte_model_and_batch()
    # A zero embedding gives zero hidden states and zero (tied) logits: the uniform distribution over 256 bytes.
    model.embed.embedding[...] = jax.numpy.zeros_like(model.embed.embedding[...])
    out = perplexity.evaluate(model, [Segment("bytes_val", x, y)], batch_size=2, byte_level=True)
    assert out["summary"]["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)
    assert out["summary"]["perplexity"] == pytest.approx(256.0, rel=1e-5)
    assert out["summary"]["tokens"] == int((y != -100).sum())
    # A text-task set whose labels stand for 2 UTF-8 bytes each (Segment.bytes_per_label): 8 bits per label, 4 per
    # byte, over both sets 8 * 2n bits / 3n bytes.
    out = perplexity.evaluate(model, [Segment("text_val", x, y, 2.0), Segment("bytes_val", x, y)], batch_size=2,
                              byte_level=True)
    assert out["results"]["text_val"]["bits_per_byte"] == pytest.approx(4.0, rel=1e-6)
    assert out["summary"]["bits_per_byte"] == pytest.approx(16 / 3, rel=1e-6)
    out = perplexity.evaluate(model, [Segment("mqar", x, y)], batch_size=2, byte_level=False)
    assert "bits_per_byte" not in out["summary"]


def test_exact_match_needs_every_labelled_position():
    labels = np.array([[-100, 3, 4, -100], [-100, 3, 4, -100], [1, -100, -100, -100]])
    preds = np.array([3, 4, 3, 0, 1])  # row 0 right, row 1 wrong on its second digit, row 2 right
    assert common.exact_match(preds, labels).tolist() == [True, False, True]


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_depth_evals_write_json_table_and_heatmap(trained_run, capsys, task):
    code, out, err = cli(capsys, "eval", str(trained_run), task, "--lengths", "40", "--depths", "0", "1",
                         "--trials", "3", "--batch-size", "6")
    assert code == 0, err
    # A token-level task the MQAR model was not trained on: it runs (transfer), with a warning naming the run's task.
    assert f"effarch: warning: {str(trained_run)!r} was trained on data.task mqar, not {task}" in err
    result = json.loads((trained_run / "eval" / f"{task}.json").read_text())
    assert result["trained_task"] == "mqar" and "not " + task in result["warning"]
    by_len = result["results"]["full"]
    assert set(by_len) == {"40"} and set(by_len["40"]["by_depth"]) == {"0.0", "1.0"}
    for r in by_len.values():  # as many trials per depth: the accuracy is the mean over depths
        assert r["accuracy"] == pytest.approx(np.mean(list(r["by_depth"].values())))
        assert 0.0 <= r["accuracy"] <= r["digit_accuracy"] <= 1.0
    assert "| full | 1.00 |" in out
    if HAS_PLOTS:
        assert (trained_run / "eval" / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result["png"] == f"{task}.png"
    else:
        assert result["png"] is None and "matplotlib is not installed" in result["png_skipped"]


def test_eval_bad_input_is_one_line_exit_2(trained_run, tmp_path, capsys):
    code, _, err = cli(capsys, "eval", str(tmp_path / "missing"), "mqar")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "eval", str(trained_run), "bleu")
    assert code == 2 and "unknown eval task 'bleu'" in err
    code, _, err = cli(capsys, "eval", str(trained_run), "mqar", "--segments", "32by4")
    assert code == 2 and "SEQ_LENxKV_PAIRS" in err
    # Zoology's default segments reach length 1024: they do not fit a vocabulary of 64.
    code, _, err = cli(capsys, "eval", str(trained_run), "mqar")
    assert code == 2 and "needs model.vocab_size > 64" in err
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    (empty / "config.yaml").write_text(dump_config(load_config([trained_run / "config.yaml"])))
    code, _, err = cli(capsys, "eval", str(empty), "perplexity")
    assert code == 2 and "no checkpoint" in err and err.count("\n") == 1
    assert not (empty / "checkpoints").exists()  # looking for checkpoints creates no directory
    # A token-level task on a model whose tokens are bytes means nothing: refused before anything is restored.
    (empty / "config.yaml").write_text(dump_config(load_config([trained_run / "config.yaml"], ["data.task=bytes"])))
    code, _, err = cli(capsys, "eval", str(empty), "passkey")
    assert code == 2 and "was trained on data.task bytes, whose tokens are text" in err
    tiny_vocab = ModelConfig(vocab_size=16, d_model=8, n_layers=1)
    with pytest.raises(common.EvalError, match="task niah needs model.vocab_size >= 36"):
        niah_eval.evaluate(DecoderLM(tiny_vocab, rngs=nnx.Rngs(0)), [40], [0.0], trials=1, seed=0, batch_size=1)


@pytest.mark.slow
def test_sweep_worker_processes_resume_after_the_whole_sweep_is_killed(tmp_path):
    """--jobs 2: one worker process per run; SIGKILL of the sweep and its workers, then a rerun finishes both."""
    path = tmp_path / "toy.yaml"
    path.write_text(SWEEP % {"root": ROOT})
    sweep_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "effarch.train.main", "sweep", str(path), "--sweep-dir", str(sweep_dir), "--jobs", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # Its own session, so that one killpg reaches the sweep and its workers; their logs are in RUN_DIR/sweep.log.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    runs = [sweep_dir / "attention-lr=0.01", sweep_dir / "attention-lr=0.0001"]
    deadline = time.time() + 300
    while not all((r / "checkpoints" / "50").is_dir() for r in runs):
        assert proc.poll() is None and time.time() < deadline, [r.joinpath("sweep.log").read_text() for r in runs]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any((r / "sweep_done.json").exists() for r in runs)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(": done in") == 2
    for r in runs:
        assert "resumed from" in (r / "sweep.log").read_text()
        assert json.loads((r / "sweep_done.json").read_text())["trained"]["step"] == 100
    assert "| attention | 0.01 | " in out.stdout



def test_sweep_rerun_with_changed_overrides_keeps_the_finished_results(toy_sweep, tmp_path, capsys):
    """A rerun whose overrides changed (here the model, so its runs are refused) leaves sweep.json and table.md of
    the finished sweep as they were and writes its own results beside them."""
    out = toy_sweep["dir"]
    finished = {name: (out / name).read_bytes() for name in ("sweep.json", "table.md")}
    path = tmp_path / "changed.yaml"
    path.write_text((SWEEP % {"root": ROOT}).replace("  model.vocab_size: 64\n", "  model.vocab_size: 64\n"
                                                                                  "  model.d_model: 48\n"))
    code, _, err = cli(capsys, "sweep", str(path), "--sweep-dir", str(out), "--jobs", "1")
    assert code == 1  # the saved runs' checkpoints are of another model: refused, nothing trained
    assert "attention-lr=0.01: finished earlier with other overrides; running it again" in err
    assert "kept sweep.json and table.md of the earlier sweep: attention-lr=0.0001, attention-lr=0.01" in err
    assert {name: (out / name).read_bytes() for name in finished} == finished
    attempt = json.loads((out / "sweep.attempt.json").read_text())
    assert all(r["status"].startswith("failed") for r in attempt["runs"]) and attempt["best"] == []


TEXT_DOCS = {"a.txt": "alpha document\n" * 20, "b.txt": "béta: ünïcode ✓\n" * 9, "sub/c.txt": "gamma " * 60,
             "sub/d.txt": "delta\n", "e.txt": "epsilon " * 23}


def test_perplexity_by_length_counts_windows_and_equals_the_default_at_seq_len(tmp_path):
    """evaluate_lengths on a packed stream of 3 documents: the pipeline's windows at each length, the same labels at
    every length, L = 8 equal to `evaluate` on the 8-token windows, the loss by position adding up, and the PNG."""
    from effarch.train.data.packing import PackedWindows, concatenate, n_windows

    rng = np.random.default_rng(0)
    tokens = concatenate([rng.integers(0, 256, n) for n in (50, 7, 90)], 256)
    held = perplexity.HeldoutText(tokens, 256, 1.0)
    model = DecoderLM(ModelConfig(vocab_size=257, d_model=8, n_layers=1, mixers=("attention",)), rngs=nnx.Rngs(1))
    out = perplexity.evaluate_lengths(model, held, [8, 32], rows={8: 4, 32: 1}, bucket=8)
    x8, y8 = PackedWindows(tokens, 8, 256).all()
    default = perplexity.evaluate(model, [Segment("text_val", x8, y8, 1.0)], batch_size=4, byte_level=False)
    r8, r32 = out["results"]["T8"], out["results"]["T32"]
    assert (r8["windows"], r32["windows"]) == (n_windows(len(tokens), 8), n_windows(len(tokens), 32)) == (19, 5)
    assert r8["tokens"] == r32["tokens"] == default["summary"]["tokens"] == len(tokens) - 1 - 2  # 2 inner seps
    for key in ("loss", "perplexity", "bits_per_token", "bits_per_byte"):
        assert r8[key] == pytest.approx(default["summary"][key], rel=1e-6)
    assert [(b["start"], b["end"]) for b in r32["by_position"]] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert sum(b["tokens"] for b in r32["by_position"]) == r32["tokens"]
    assert r32["loss"] == pytest.approx(sum(b["loss"] * b["tokens"] for b in r32["by_position"]) / r32["tokens"])
    assert out["summary"]["bits_per_byte_T32"] == r32["bits_per_byte"]
    result = {"options": {"lengths": [8, 32], "train_seq_len": 8}, **out}
    if HAS_PLOTS:
        perplexity.plot(result, str(tmp_path / "p.png"))
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(common.EvalError, match="length 150 is longer than the held-out text"):
        perplexity.evaluate_lengths(model, held, [150], rows={150: 1}, bucket=8)


@pytest.mark.slow
def test_perplexity_by_length_on_a_text_run(tmp_path, capsys):
    """`perplexity --lengths` on a random-init byte model of a text run (written as a run directory at step 0):
    the windows are the held-out stream's at each length, L = data.seq_len is the default evaluation exactly, every
    length scores the same labels, and the JSON, table and PNG are written."""
    from effarch.train.config import Config, DataConfig, TextData, TrainConfig
    from effarch.train.convert import write_run
    from effarch.train.data.packing import n_windows

    corpus = tmp_path / "corpus"
    for name, text in TEXT_DOCS.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text)
    cfg = Config(model=ModelConfig(vocab_size=257, d_model=8, n_layers=1, mixers=("attention",)),
                 data=DataConfig(task="text", seq_len=8, text=TextData(source=str(corpus), val_fraction=0.2)),
                 train=TrainConfig(batch_size=1, eval_batch_size=4))
    run_dir = write_run(cfg, nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param), tmp_path / "run")
    held = perplexity.heldout_text(cfg)
    assert held.sep_id == 256 and 0.5 < held.bytes_per_label < 1  # the separators' labels stand for no byte

    code, _, err = cli(capsys, "eval", run_dir, "perplexity")
    assert code == 0, err
    default = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    assert default["png"] is None and "png_skipped" not in default  # nothing to draw without --lengths
    code, out, err = cli(capsys, "eval", run_dir, "perplexity", "--lengths", "8", "32", "--bucket", "4")
    assert code == 0, err
    result = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    r8, r32 = result["results"]["T8"], result["results"]["T32"]
    for t, r in ((8, r8), (32, r32)):
        assert r["windows"] == n_windows(len(held.tokens), t) == len(held.windows(t)[0])
        assert [b["start"] for b in r["by_position"]] == list(range(0, t, 4))
        assert sum(b["tokens"] for b in r["by_position"]) == r["tokens"]
        assert r["loss"] == pytest.approx(
            sum(b["loss"] * b["tokens"] for b in r["by_position"] if b["tokens"]) / r["tokens"], rel=1e-6)
    assert r8["tokens"] == r32["tokens"] == default["summary"]["tokens"]  # every held-out label, at both lengths
    for key in ("loss", "perplexity", "bits_per_token", "bits_per_byte"):
        assert r8[key] == pytest.approx(default["summary"][key], rel=1e-6)  # L = seq_len: the existing evaluation
    assert result["summary"]["bits_per_byte_T32"] == r32["bits_per_byte"] and result["options"]["bucket"] == 4
    assert "| 32 | %d |" % r32["windows"] in out and "loss by position (buckets of 4 tokens)" in out
    assert result["png"] == "perplexity.png"
    assert (run_dir / "eval" / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, _ = cli(capsys, "eval", run_dir, "perplexity", "--lengths", "32", "--max-examples", "2")
    assert code == 0 and json.loads((run_dir / "eval" / "perplexity.json").read_text())["results"]["T32"][
        "windows"] == 2
    # Bad input: one line each.
    too_long = len(held.tokens)
    for argv, message in ((["--lengths", "1"], "each length must be >= 2 tokens, got 1"),
                          (["--lengths", "8", str(too_long)], f"length {too_long} is longer than the held-out text"),
                          (["--bucket", "4"], "--bucket needs --lengths")):
        code, _, err = cli(capsys, "eval", run_dir, "perplexity", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_perplexity_lengths_of_a_bos_run_start_every_window_with_bos(tmp_path):
    """data.text.bos: the windows cut at every length start with BOS, as the trainer's evaluation windows do (at
    L = seq_len they are those windows), and score the same labels as without BOS."""
    import dataclasses

    from effarch.train.config import Config, DataConfig, TextData
    from effarch.train.data.labels import IGNORE_LABEL

    corpus = tmp_path / "corpus"
    for name, text in TEXT_DOCS.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text)
    text = TextData(source=str(corpus), val_fraction=0.2, bos=True)
    cfg = Config(model=ModelConfig(vocab_size=258, d_model=8, n_layers=1),
                 data=DataConfig(task="text", seq_len=8, data_dir=str(tmp_path / "tfds"), text=text))
    held = perplexity.heldout_text(cfg)
    plain = perplexity.heldout_text(dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, text=dataclasses.replace(text, bos=False))))
    assert held.bos_id == 257 and plain.bos_id is None and held.bytes_per_label == plain.bytes_per_label
    (seg,) = perplexity.heldout_segments(cfg)
    np.testing.assert_array_equal(held.windows(8)[0], seg.inputs)
    np.testing.assert_array_equal(held.windows(8)[1], seg.labels)
    for length in (8, 32, 64):
        x, y = held.windows(length)
        assert (x[:, 0] == 257).all() and (x[:, 1:] != 257).all()
        assert (y != IGNORE_LABEL).sum() == (plain.windows(length)[1] != IGNORE_LABEL).sum()
        np.testing.assert_array_equal(x[:, 1:][y[:, :-1] != IGNORE_LABEL], y[:, :-1][y[:, :-1] != IGNORE_LABEL])



# Writes and restores a run's checkpoint (9 s on 2 loaded cores): the slow suite.
@pytest.mark.slow
def test_generate_text_of_a_bos_run_starts_with_bos(tmp_path, monkeypatch, capsys):
    """`effarch generate RUN --text` of a data.text.bos run feeds BOS first, as every training window had it."""
    from effarch.train.config import Config, DataConfig, TextData
    from effarch.train.convert import write_run
    from effarch.train.main import main

    cfg = Config(model=ModelConfig(vocab_size=258, d_model=8, n_layers=1),
                 data=DataConfig(task="text", seq_len=8, text=TextData(bos=True)))
    run_dir = write_run(cfg, nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param), tmp_path / "run")
    prompts = []

    def fake_generate(model, prompt, max_new_tokens, **kwargs):
        prompts.append(np.asarray(prompt).tolist())
        return np.zeros((1, max_new_tokens), np.int32) + 97

    monkeypatch.setattr("effarch.train.generate.generate", fake_generate)
    main(["generate", str(run_dir), "--text", "ab", "--max-new-tokens", "2"])
    assert prompts == [[[257, 97, 98]]] and capsys.readouterr().out.strip() == "aa"


def test_perplexity_lengths_of_a_bytes_stream_and_other_tasks(tmp_path):
    """bytes: windows of L + 1 bytes at a stride of L, the remainder dropped, from the trainer's held-out bytes (at
    L = seq_len its very windows); a token task has no text to cut."""
    from effarch.train.config import Config, DataConfig, TextData

    held = perplexity.HeldoutText(np.arange(23, dtype=np.int32), None, 1.0)
    x, y = held.windows(5)
    assert x.shape == (4, 5) and x[1].tolist() == [5, 6, 7, 8, 9] and y[1].tolist() == [6, 7, 8, 9, 10]
    (tmp_path / "corpus").mkdir()
    for name, text in TEXT_DOCS.items():
        (tmp_path / "corpus" / name.replace("/", "_")).write_text(text)
    cfg = Config(model=ModelConfig(vocab_size=256, d_model=8, n_layers=1),
                 data=DataConfig(task="bytes", seq_len=8, text=TextData(source=str(tmp_path / "corpus"),
                                                                         val_fraction=0.2)))
    (seg,) = perplexity.heldout_segments(cfg)
    held = perplexity.heldout_text(cfg)
    assert held.sep_id is None and held.bytes_per_label == 1.0
    x, y = held.windows(8)
    np.testing.assert_array_equal(x, seg.inputs)
    np.testing.assert_array_equal(y, seg.labels)
    assert len(held.windows(16)[0]) == (seg.inputs.size) // 16
    cfg = load_config([ROOT / "configs/mqar/zoology_attention.yaml"])
    with pytest.raises(common.EvalError, match="needs a run trained on data.task text or bytes, not mqar"):
        perplexity.heldout_text(cfg)


def test_decoded_outputs_through_a_full_budget_policy_equal_the_full_forward():
    from effarch.layers.kv_policies import make_policy

    model, x, y = byte_model_and_batch()
    want_pred, want_ce = common.labelled_outputs(model, x, y, batch_size=2)
    model.set_kv_policy(make_policy("quest", ["budget=16", "page=4"]))  # 16 >= 13 tokens: everything is read
    pred, ce = common.labelled_outputs(model, x, y, batch_size=5)  # decoded: prefill to the first label, then steps
    np.testing.assert_array_equal(pred, want_pred)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5, atol=1e-5)
    model.set_kv_policy(make_policy("window", ["budget=3", "n_sink=1"]))  # a 3-token window changes the late ones
    common.KV_READS.reset()
    _, small = common.labelled_outputs(model, x, y, batch_size=5)
    assert np.abs(small - want_ce).max() > 1e-4
    p0, last = np.nonzero(y != -100)[1].min(), np.nonzero(y != -100)[1].max()
    assert common.KV_READS.steps == last - p0  # one layer, one decode step per position after the first label
    # The step for position t sees t + 1 tokens and reads min(3, t + 1) of them.
    assert common.KV_READS.per_step() == pytest.approx(np.mean([min(3, t + 1) for t in range(p0 + 1, last + 1)]))


def test_decoded_outputs_with_a_context_prefill_decode_the_question_through_the_policy():
    from effarch.layers.kv_policies import make_policy

    model, x, y = byte_model_and_batch()
    y[:, :8] = -100  # the labels of the last 5 positions: the first 8 tokens stand for the context and question
    want_pred, want_ce = common.labelled_outputs(model, x, y, batch_size=2)
    rows, cols = np.nonzero(y != -100)
    p0, last = cols.min(), cols.max()
    q = np.full(len(x), 2)  # 2 tokens prefilled, the "question" (positions 2..p0) decoded
    model.set_kv_policy(make_policy("quest", ["budget=16", "page=4"]))  # everything is read: the full cache
    common.KV_READS.reset()
    pred, ce = common.labelled_outputs(model, x, y, batch_size=5, prefill=q)
    np.testing.assert_array_equal(pred, want_pred)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5, atol=1e-5)
    assert common.KV_READS.steps == last + 1 - 2  # one layer, one step per token from position 2 on
    # A 3-token window: by default p0's output comes from the dense prefill (equal to the full forward); with the
    # context prefill the tokens before p0 were decoded through the window too, so p0's output changes.
    model.set_kv_policy(make_policy("window", ["budget=3", "n_sink=1"]))
    at_p0 = cols == p0
    _, ce_prompt = common.labelled_outputs(model, x, y, batch_size=5)
    np.testing.assert_allclose(ce_prompt[at_p0], want_ce[at_p0], rtol=1e-5, atol=1e-5)
    _, ce_context = common.labelled_outputs(model, x, y, batch_size=5, prefill=q)
    assert np.abs(ce_context[at_p0] - want_ce[at_p0]).max() > 1e-4
    with pytest.raises(ValueError, match="prefill must be"):
        common.labelled_outputs(model, x, y, batch_size=5, prefill=np.zeros(len(x), int))
    np.testing.assert_array_equal(common.question_starts(np.array([[1, 7, 2, 7, 3], [7, 0, 0, 0, 0]]), 7), [3, 0])


def test_eval_kv_policy_writes_its_own_result(trained_run, capsys):
    code, out, err = cli(capsys, "eval", str(trained_run), "passkey", "--lengths", "40", "--depths", "0.5",
                         "--trials", "2", "--batch-size", "2", "--kv-policy", "window", "budget=16")
    assert code == 0, err
    result = json.loads((trained_run / "eval" / "passkey.kv-window-budget16.json").read_text())
    assert result["kv_policy"]["name"] == "window" and result["kv_policy"]["budget"] == 16
    assert result["kv_policy"]["layers"] == [1]  # Zoology's hybrid: the base_conv layer 0 decodes as before
    # --kv-prefill context (the default): the question [Q] [PK] and the first 4 answer digits are 6 decode steps,
    # each after >= 34 > 16 tokens.
    assert result["kv_policy"]["tokens_read_per_step"] == 16 and result["kv_policy"]["prefill"] == "context"
    assert result["options"]["kv_prefill"] == "context"
    assert result["kv_policy"]["kv_bytes_read_per_step"] == 16 * 2 * 32 * 4  # K and V of d_model 32, float32
    assert set(result["results"]) == {"kv_window16"} and "| kv_window16 |" in out
    assert "passkey.kv-window-budget16.json" in out
    code, out, err = cli(capsys, "eval", str(trained_run), "passkey", "--lengths", "40", "--depths", "0.5",
                         "--trials", "2", "--batch-size", "2", "--kv-policy", "window", "budget=16",
                         "--kv-prefill", "prompt")  # the old protocol, in a file of its own
    assert code == 0, err
    result = json.loads((trained_run / "eval" / "passkey.kv-window-budget16-prefillprompt.json").read_text())
    assert result["kv_policy"]["prefill"] == "prompt"
    code, _, err = cli(capsys, "eval", str(trained_run), "niah", "--kv-policy", "quest", "budget=8", "page=16")
    assert code == 2 and "--kv-policy: kv policy quest: page must be in [1, budget=8]" in err
    assert err.count("\n") == 1
    code, _, err = cli(capsys, "eval", str(trained_run), "perplexity", "--kv-policy", "lru")
    assert code == 2 and "unknown kv policy 'lru'" in err


def test_sweep_collects_kv_policy_results(toy_sweep, tmp_path):
    from effarch.train.evals.sweep_results import eval_result_name

    # A sweep eval with --kv-policy reads the file that eval writes.
    argv = ["--lengths", "512", "--kv-policy", "quest", "budget=64", "page=8", "--trials", "2"]
    assert eval_result_name("passkey", argv) == "passkey.kv-quest-budget64-page8"
    assert eval_result_name("passkey", ["--trials", "2"]) == "passkey"
    prompt = ["--kv-policy", "window", "--kv-prefill", "prompt"]
    assert eval_result_name("niah", prompt) == "niah.kv-window-prefillprompt"
    assert eval_result_name("niah", ["--kv-prefill", "context", "--kv-policy", "window"]) == "niah.kv-window"
    # A path option (act's calibration file) becomes one file name, not directories.
    cal = tmp_path / "act.json"
    cal.write_text(json.dumps({"heads": [[1, 0]], "beta": 0.4, "tau": 0.1}))
    name = eval_result_name("niah", ["--kv-policy", "act", f"calibration={cal}"])
    assert name == "niah.kv-act-calibration" + str(cal).strip("/").replace("/", "_") and "/" not in name
    # A KV-policy result written after the sweep (as `effarch eval RUN_DIR perplexity --kv-policy ...` writes it)
    # joins table.md's KV-policy table on --collect, beside the run's full-cache perplexity.
    run, sweep_dir = toy_sweep["trained"], toy_sweep["dir"]
    kv_file = run / "eval" / "perplexity.kv-window-budget16.json"
    full = json.loads((run / "eval" / "perplexity.json").read_text())
    kv_file.write_text(json.dumps({
        "task": "perplexity", "summary": {"loss": 3.25, "perplexity": 25.8},
        "kv_policy": {"name": "window", "describe": "window budget=16 n_sink=4", "budget": 16, "layers": [1],
                      "tokens_read_per_step": 15.5, "kv_bytes_read_per_step": 3968.0}}))
    try:
        assert main_code(["sweep", str(toy_sweep["path"]), "--sweep-dir", str(sweep_dir), "--collect"]) == 0
        summary = json.loads((sweep_dir / "sweep.json").read_text())
        run_row = next(r for r in summary["runs"] if r["name"] == "attention-lr=0.01")
        (kv,) = [kv for kv in run_row["kv"] if kv["task"] == "perplexity"]  # passkey's: an earlier test's
        assert kv["policy"] == "window budget=16 n_sink=4" and kv["budget"] == 16
        table = (sweep_dir / "table.md").read_text()
        section = table.split("## KV policies: perplexity")[1].split("## ")[0]
        head = next(line for line in section.splitlines() if line.startswith("| run | policy | budget |"))
        assert head.endswith("| KV tokens read / token | KV bytes read / token |")
        assert f"| attention-lr=0.01 | full cache | — | {full['summary']['loss']:.4f} | " in section
        assert "| attention-lr=0.01 | window budget=16 n_sink=4 | 16 | 3.2500 | 25.8000 |" in section
        assert section.rstrip().endswith("| 15.5 | 3,968 |")
    finally:
        kv_file.unlink()
        main_code(["sweep", str(toy_sweep["path"]), "--sweep-dir", str(sweep_dir), "--collect"])
    assert "## KV policies: perplexity" not in (sweep_dir / "table.md").read_text()


@pytest.mark.slow
def test_act_search_writes_the_calibration_that_act_reads(trained_run, tmp_path, capsys):
    from effarch.layers.kv_policies import make_policy

    out = tmp_path / "act.json"
    code, stdout, err = cli(capsys, "act-search", str(trained_run), "--out", str(out), "--calibration-batches", "1",
                            "--batch-size", "8", "--tau", "0.05")
    assert code == 0, err
    cal = json.loads(out.read_text())
    assert "effarch: act calibration for" in stdout and cal["beta"] == 0.4 and cal["tau"] == 0.05
    base = cal["baseline"]["loss"]
    assert set(cal["per_head"]) == {"1:0"} or all(k.startswith("1:") for k in cal["per_head"])  # layer 0: base_conv
    assert [f"{a}:{b}" for a, b in cal["heads"]] == [k for k, v in cal["per_head"].items() if v["loss"] < base]
    assert any(v["loss"] != base for v in cal["per_head"].values())  # the calibration changes what a head reads
    policy = make_policy("act", [f"calibration={out}"])
    assert [list(h) for h in policy._heads] == cal["heads"]
    code, _, err = cli(capsys, "act-search", str(trained_run), "--out", str(out), "--beta", "3")
    assert code == 2 and "act-search: beta must be in [0, 1], got 3.0" in err and err.count("\n") == 1
