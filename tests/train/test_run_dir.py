"""Run directories are never discarded or reinterpreted without the user's say (train/run_dir.py)."""

import logging
import os
from pathlib import Path

import pytest

from effarch.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"
BASE = ROOT / "configs" / "mqar" / "zoology_attention.yaml"


def train(run_dir, *overrides):
    from effarch.train.train import train_and_evaluate

    cfg = load_config([BASE, TINY], [f"train.run_dir={run_dir}", "train.async_checkpoint=false", *overrides])
    return train_and_evaluate(cfg)


def snapshot(directory: Path) -> dict:
    """{relative path: (size, mtime)} of every file: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_changed_optimizer_is_refused_naming_the_key_and_leaves_checkpoints_intact(tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert train(run_dir, "train.steps=4").step == 4
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(ConfigError) as e:
        train(run_dir, "train.steps=6", "optim.clip_norm=null")
    msg = str(e.value)
    assert "optim.clip_norm (1.0 -> null)" in msg and "train.resume=never" in msg and "init_from" in msg
    assert "\n" not in msg
    assert snapshot(run_dir / "checkpoints") == before  # nothing skipped, moved or overwritten
    with pytest.raises(ConfigError, match=r"model.d_model \(32 -> 48\), optim.lr"):  # every differing key
        train(run_dir, "model.d_model=48", "optim.lr=0.5")
    with pytest.raises(ConfigError, match=r"data.seed \(0 -> 1\)"):  # the data order
        train(run_dir, "data.seed=1")
    # Harmless changes resume and are logged.
    with caplog.at_level(logging.INFO, logger="effarch"):
        result = train(run_dir, "train.steps=6", "train.eval_every=3", "train.log_every=2")
    assert result.step == 6
    assert "resumed from" in caplog.text and "at step 4" in caplog.text
    assert "changed setting: train.steps 4 -> 6" in caplog.text


def test_resume_never_moves_the_old_run_aside_and_require_needs_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.resume=require: .* has no checkpoint"):
        train(run_dir, "train.resume=require")
    train(run_dir, "train.steps=4")
    old = snapshot(run_dir / "checkpoints")
    result = train(run_dir, "train.steps=2", "optim.clip_norm=null", "train.resume=never")
    assert result.step == 2  # from step 0, with the new optimizer
    (archive,) = (run_dir / "previous").iterdir()
    assert snapshot(archive / "checkpoints") == old and (archive / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert train(run_dir, "train.steps=4", "optim.clip_norm=null", "train.resume=require").step == 4


def test_a_run_that_fails_before_its_first_step_leaves_the_directory_reusable(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="data: "):
        train(run_dir, "data.task=bytes", f"data.text.source={tmp_path}/missing/*.txt")
    # Another model and data: nothing was trained in that directory, so nothing binds it.
    assert train(run_dir, "train.steps=2", "model.d_model=48").step == 2


def test_damaged_newest_checkpoint_is_skipped_and_its_step_written_again(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    os.remove(run_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA")  # as if killed while finalising
    with pytest.warns(UserWarning, match="checkpoints/4 is incomplete"):
        result = train(run_dir, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    assert result.step == 4
    assert [p.name.split("-")[0] for p in (run_dir / "checkpoints_unreadable").iterdir()] == ["4"]
    assert (run_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").is_file()  # step 4 saved again
