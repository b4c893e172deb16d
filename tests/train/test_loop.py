"""The training loop with prefetch and the deferred NaN/inf check, run in-process on the tiny MQAR config.

The reference is the plain loop (no prefetch, every step's metrics read back). Runs here log every 4 steps, so most
steps are never read back (the last test counts the readbacks): the tests below show that this changes no loss, no
resume and no checkpoint decision.
"""

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import effarch.train.train as train_module
from effarch.train.config import load_config
from effarch.train.health import TrainingDiverged
from effarch.train.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]
BASE, TINY = ROOT / "configs" / "mqar" / "zoology_attention.yaml", ROOT / "configs" / "overlays" / "tiny.yaml"
STEPS = 16


def run(run_dir, *overrides):
    cfg = load_config([BASE, TINY], [f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.eval_every=1000",
                                     "train.checkpoint_every=1000", "train.async_checkpoint=false",
                                     "optim.schedule=constant", *overrides])  # the lr does not depend on steps
    return train_and_evaluate(cfg)


def logged(run_dir) -> dict[int, dict]:
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


def checkpoints(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def no_prefetch_thread() -> bool:
    return not any(t.name == "effarch-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[int, float]:
    """Losses of every step of the plain loop: no prefetch, metrics read back after every step."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    run(run_dir, "train.prefetch=0", "train.log_every=1")
    return {s: r["loss"] for s, r in logged(run_dir).items()}


class Hooked:
    """A train stream that calls `hook(step, inputs)` on each batch it makes (on the prefetch thread)."""

    def __init__(self, stream, hook):
        self.stream, self.hook = stream, hook

    def __getattr__(self, name):  # everything else the loop reads (max_labels_per_example, ...) is the stream's
        return getattr(self.stream, name)

    def batch(self, step, rows=slice(None)):
        x, y = self.stream.batch(step, rows)
        return self.hook(step, x.copy()), y


def hook_data(monkeypatch, hook):
    build = train_module.build_data

    def hooked_build(*args):
        stream, evals = build(*args)
        return Hooked(stream, hook), evals

    monkeypatch.setattr(train_module, "build_data", hooked_build)


def test_prefetch_and_deferred_readback_give_the_plain_losses(tmp_path, plain):
    run_dir = tmp_path / "run"
    result = run(run_dir, "train.prefetch=3", "train.log_every=4")
    got = logged(run_dir)
    assert sorted(got) == [4, 8, 12, 16] and result.step == STEPS
    np.testing.assert_array_equal([got[s]["loss"] for s in got], [plain[s] for s in got])
    for rec in got.values():  # the window's throughput: positive and consistent with each other
        assert rec["step_time_s"] > 0 and rec["tokens_per_s"] == pytest.approx(8 * 32 / rec["step_time_s"])
    # Each window's time is wall time between log steps (4 steps each), so together they fit in the run's wall time.
    assert 4 * sum(rec["step_time_s"] for rec in got.values()) < result.wall_time_s
    assert no_prefetch_thread()


def test_resume_with_prefetch_sees_the_same_batches(tmp_path, plain):
    run_dir = tmp_path / "run"
    run(run_dir, "train.prefetch=2", "train.log_every=4", "train.steps=6")  # stops at 6, a non-log step
    assert checkpoints(run_dir) == [6]
    run(run_dir, "train.prefetch=2", "train.log_every=4")  # resumes at step 6: the prefetcher starts there
    got = logged(run_dir)
    assert sorted(got) == [4, 6, 8, 12, 16]
    np.testing.assert_array_equal([got[s]["loss"] for s in got], [plain[s] for s in got])


def test_sigterm_between_log_steps_checkpoints_and_resumes(tmp_path, plain, monkeypatch):
    def term_at_7(step, x):
        if step == 7:  # made two to three steps ahead of the loop, which is around step 5 then
            os.kill(os.getpid(), signal.SIGTERM)
        return x

    hook_data(monkeypatch, term_at_7)
    run_dir = tmp_path / "run"
    result = run(run_dir, "train.prefetch=2", "train.log_every=4")
    assert result.stopped_by == "SIGTERM" and 4 < result.step < STEPS, result
    assert checkpoints(run_dir) == [result.step]  # saved where it stopped
    assert no_prefetch_thread()
    monkeypatch.undo()
    run(run_dir, "train.prefetch=2", "train.log_every=4")
    got = logged(run_dir)
    assert {4, 8, 12, 16} <= set(got)
    np.testing.assert_array_equal([got[s]["loss"] for s in got], [plain[s] for s in got])


def poison_step_6(step, x):
    """Step 6 (1-based; batch index 5) gets a token outside the vocabulary: its embedding, and so its loss, is NaN
    (jnp.take fills out-of-range rows with NaN); every later step inherits NaN parameters."""
    if step == 5:
        x[:] = 256
    return x


@pytest.mark.parametrize(
    "cadence, good",
    [
        (["train.log_every=4", "train.checkpoint_every=5"], 5),  # caught at the next log step (8)
        (["train.log_every=10", "train.checkpoint_every=4"], 4),  # caught before the checkpoint at 8
    ],
)
def test_nan_at_a_non_log_step_stops_before_anything_is_saved(tmp_path, monkeypatch, cadence, good):
    hook_data(monkeypatch, poison_step_6)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        run(run_dir, "train.prefetch=2", *cadence)
    msg = str(info.value)
    assert msg.startswith("loss is nan (grad norm nan) at step 6, found at step 8"), msg
    assert f"Last good checkpoint: step {good} in {run_dir / 'checkpoints'}" in msg, msg
    assert checkpoints(run_dir) == [good]  # nothing saved at or after the bad step
    assert all(s < 6 for s in logged(run_dir)), logged(run_dir)  # no NaN record was written
    assert no_prefetch_thread()


def test_a_data_error_on_the_prefetch_thread_reaches_the_caller(tmp_path, monkeypatch):
    def fail_at_3(step, x):
        if step == 3:
            raise OSError("record 3 is corrupt")
        return x

    hook_data(monkeypatch, fail_at_3)
    with pytest.raises(OSError, match="record 3 is corrupt") as info:
        run(tmp_path / "run", "train.prefetch=2", "train.log_every=1")
    assert "producing the batch of step 3" in " ".join(info.value.__notes__)
    assert sorted(logged(tmp_path / "run")) == [1, 2, 3]  # the steps before it ran
    assert no_prefetch_thread()


def test_results_are_read_back_only_at_log_steps(tmp_path, monkeypatch, log_every=8):
    """Counts host readbacks of jax arrays (every `float(x)`, `np.asarray(x)` and `jax.device_get(x)` goes through
    ArrayImpl._value) between the dispatches of consecutive steps: none except after a log step."""
    from jax._src.array import ArrayImpl

    from effarch.train.train import Trainer

    reads, marks = [0], []
    value = ArrayImpl._value

    def counted(self):
        reads[0] += 1
        return value.fget(self)

    def dispatch(self, *args, _step=Trainer.train_step_checked):
        marks.append(reads[0])
        return _step(self, *args)

    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    monkeypatch.setattr(Trainer, "train_step_checked", dispatch)
    run(tmp_path / "run", "train.prefetch=2", f"train.log_every={log_every}")
    between = [b - a for a, b in zip(marks, marks[1:])]  # readbacks after step i + 1, before step i + 2 starts
    assert len(between) == STEPS - 1
    for i, n in enumerate(between):
        if (i + 1) % log_every:
            assert n == 0, (i + 1, between)
        else:  # the instrument sees the log step's readback (metrics and the NaN/inf record)
            assert n >= 4, (i + 1, between)
