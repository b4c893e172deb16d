"""Nothing damages a run: the run-directory checks and lock, honest eval and metrics records, visible log lines, and
a full disk that stops the run at its first failed save (train/run_dir.py, run_lock.py, checkpoint.py, metrics.py)."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effarch.train.config import ConfigError
from tests.train.test_run_dir import BASE, TINY, train


def cli(run_dir, *overrides, wait=True):
    cmd = [sys.executable, "-m", "effarch.train", str(BASE), str(TINY), f"train.run_dir={run_dir}", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests copy it)."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    train(run_dir, "train.steps=4", "train.keep_checkpoints=3")
    return run_dir


def copy_run(source, tmp_path):
    import shutil

    shutil.copytree(source, Path(tmp_path) / "run")
    return Path(tmp_path) / "run"


# 1 ----------------------------------------------------------------------------------------------------------------
def test_run_dir_is_checked_and_resume_never_moves_only_the_runs_files(tmp_path, monkeypatch, caplog, four_steps):
    work = tmp_path / "clone"
    (work / ".git").mkdir(parents=True)
    (work / "README.md").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match="train.run_dir is empty"):  # would have been the current directory
        train("")
    with pytest.raises(ConfigError, match=r"is not a run directory \(it holds .git, README.md\)"):
        train(work)
    assert sorted(p.name for p in work.iterdir()) == [".git", "README.md"]  # nothing moved, nothing created

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run_dir = copy_run(four_steps, tmp_path / "home")
    (run_dir / "notes.txt").write_text("the user's")
    with caplog.at_level(logging.INFO, logger="effarch"):
        result = train("~/run", "train.steps=2", "train.resume=never")
    assert (result.run_dir, result.step) == (run_dir, 2)  # `~` expanded; started again from step 0
    assert not (work / "~").exists()
    (archive,) = (run_dir / "previous").iterdir()
    assert {"checkpoints", "config.yaml", "metrics.jsonl", "run_info.json", "tb"} <= {p.name for p in archive.iterdir()}
    assert "notes.txt" not in {p.name for p in archive.iterdir()}
    assert (run_dir / "notes.txt").read_text() == "the user's"
    assert f"moved the previous run's config.yaml, run_info.json, metrics.jsonl, tb, checkpoints to {archive}; " \
           "left in place: notes.txt" in caplog.text


# 2 ----------------------------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from effarch.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_training_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    from effarch.train.run_lock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = cli(run_dir)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"effarch: error: train.run_dir: {run_dir} is in use by another training run (pid {holder.pid} holds "
            f"{run_dir}/run.lock); wait for it to finish, stop it, or choose another run_dir")
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stdout.close()
    with RunLock(run_dir):  # the kernel released the killed holder's lock
        pass


@pytest.mark.slow
@pytest.mark.filterwarnings("error::UserWarning")  # a reader must never find a damaged or half-written checkpoint
def test_eval_reads_committed_checkpoints_while_a_run_saves_and_deletes(tmp_path):
    from effarch.train.generate import restore_run

    run_dir = tmp_path / "run"
    first = cli(run_dir, "train.steps=100000", "train.checkpoint_every=5", "train.log_every=1",
                "train.eval_every=100000", "train.async_checkpoint=true", wait=False)
    try:
        t0 = time.time()
        while len([p for p in run_dir.glob("checkpoints/*") if p.name.isdigit()]) < 2:
            assert first.poll() is None, first.communicate()
            assert time.time() - t0 < 180
            time.sleep(0.1)
        # Readers take no lock and see committed checkpoints only, while the run keeps saving (and deleting).
        steps = [restore_run(run_dir)[2] for _ in range(3)]
        assert all(s % 5 == 0 for s in steps) and steps == sorted(steps)
        assert first.poll() is None  # the training was not disturbed
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "stopped by SIGTERM" in out, err


# 3 ----------------------------------------------------------------------------------------------------------------
def test_eval_records_the_step_it_restored(tmp_path, four_steps):
    from effarch.train.evals import run_eval

    run_dir = copy_run(four_steps, tmp_path)
    os.remove(run_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA")  # the newest checkpoint cannot be read
    with pytest.warns(UserWarning, match="checkpoints/4 is incomplete"):
        result = run_eval(run_dir, "perplexity", ["--max-examples", "8"], log=None)
    assert result["checkpoint_step"] == 2
    assert json.loads((run_dir / "eval" / "perplexity.json").read_text())["checkpoint_step"] == 2


# 4 ----------------------------------------------------------------------------------------------------------------
def test_resume_cuts_a_torn_metrics_line_marks_the_resume_and_readers_take_the_resumed_records(tmp_path, four_steps):
    import shutil

    from effarch.train.metrics import read_metrics

    run_dir = copy_run(four_steps, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "4")  # killed after logging step 4, before its checkpoint...
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # ... while writing a line
    old = {r["step"]: r for r in read_metrics(run_dir)}
    train(run_dir, "train.steps=6", "train.keep_checkpoints=3")  # resumes at step 2 under a longer schedule
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole
    resumed = [r for r in records if r.get("event") == "resumed"]
    (resumed,) = resumed
    assert (resumed["step"], resumed["cut_bytes"]) == (2, len('{"step": 5, "lo'))
    assert resumed["changed"]["train.steps"] == [4, 6]
    assert sum(1 for r in records if r.get("step") == 3 and "loss" in r) == 2  # step 3 was taken twice...
    new = read_metrics(run_dir)
    assert [r["step"] for r in new] == [1, 2, 3, 4, 5, 6]  # ... and readers see it once
    assert new[2]["lr"] != old[3]["lr"]  # the resumed run's record (the schedule moved), not the abandoned one
    assert new[1] == old[2]


# 5 ----------------------------------------------------------------------------------------------------------------
def test_info_lines_reach_the_console_despite_absl(tmp_path, four_steps):
    run_dir = copy_run(four_steps, tmp_path)
    out = cli(run_dir, "train.steps=6", "train.keep_checkpoints=3")
    assert out.returncode == 0, out.stderr
    assert f"effarch: resumed from {run_dir}/checkpoints at step 4" in out.stderr
    assert "effarch: resuming with a changed setting: train.steps 4 -> 6" in out.stderr
    assert "INFO" not in out.stderr  # once, as an effarch line (absl's handler does not print it again)


# 8 ----------------------------------------------------------------------------------------------------------------
def test_a_failed_async_save_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    from orbax.checkpoint._src.path import atomicity

    from effarch.train.generate import restore_run
    from effarch.train.main import main
    from effarch.train.metrics import read_metrics

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_step_4(self, *args, **kwargs):  # the commit of a save, on Orbax's background thread
        if self.get().parent.name.startswith("4."):  # the checkpoint's top-level directory
            raise OSError(errno.ENOSPC, "No space left on device")
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_4)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", str(BASE), str(TINY), f"train.run_dir={run_dir}", "train.steps=200", "train.log_every=1",
              "train.async_checkpoint=true", "train.keep_checkpoints=1", "train.eval_every=1000"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("effarch: error:")]
    assert f"saving checkpoint {run_dir}/checkpoints/4 failed (OSError: [Errno 28] No space left on device)" in line
    assert f"Last good checkpoint: step 2 in {run_dir}/checkpoints" in line
    assert "Traceback" not in err
    assert max(r["step"] for r in read_metrics(run_dir)) <= 6  # stopped at the next save at the latest
    assert restore_run(run_dir)[2] == 2  # the last good checkpoint is intact (keep_checkpoints=1 deleted nothing)
