"""A run directory is the user's work: decide whether a new start may resume it, and never discard it.

`prepare_run_dir` runs before anything is built:
- The saved `config.yaml` binds only once the run has a checkpoint. A run that failed before its first checkpoint
  (a bad data path, a model that would not build) left nothing to protect, so a corrected config simply replaces it.
- With checkpoints, `train.resume` decides. "auto" / "require" resume, but first compare the saved resolved config
  with the new one: a change that would make the checkpoint's trees or the data order mean something else (model,
  optimizer, batch size, data, seed, freeze patterns) is refused with one line naming every differing key;
  harmless ones (step count, cadences, evaluation sets, mesh, dtype, kernel choice) are allowed and logged.
  "never" moves the old run (checkpoints, metrics, config) to `previous/<time>/` and starts from step 0.
"""

import importlib.metadata
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import jax
import yaml

from effarch.train.config import Config, ConfigError, dump_config, to_dict

log = logging.getLogger("effarch")

# Keys whose change leaves a checkpoint meaning what it meant: when, how often and how much to run, what to evaluate
# on, where the arrays live and in which dtype they are computed, which kernel computes the same function.
HARMLESS_KEYS = {
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batch_size", "train.stop_at_accuracy",
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint", "train.progress", "train.run_dir",
    "train.resume", "train.init_from", "train.init_mismatch", "train.compute_dtype", "train.grad_accum_steps",
    "model.remat", "data.mqar.test_segments", "sharding_rules", "data.data_dir", "train.sample_tokens",
    "train.prefetch",
}
HARMLESS_PREFIXES = ("mesh.",)
HARMLESS_SUFFIXES = (".implementation",)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def is_harmless(key: str) -> bool:
    return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES) or key.endswith(HARMLESS_SUFFIXES)


def config_changes(saved: dict, cfg: Config) -> tuple[dict, dict]:
    """({key: (saved, new)} that change the run's meaning, {key: (saved, new)} that do not).

    Keys missing from an older saved config count as their default value, so adding a field to a config dataclass
    does not make every old run unresumable.
    """
    defaults = _flat(to_dict(Config()))
    old, new = {**defaults, **_flat(saved)}, _flat(to_dict(cfg))
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    refused = {k: v for k, v in changed.items() if not is_harmless(k)}
    allowed = {k: v for k, v in changed.items() if is_harmless(k)}
    return refused, allowed


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Step directories under run_dir/checkpoints (complete or not: either is work that must not be lost)."""
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def _archive(run_dir: Path) -> Path | None:
    """Moves everything of the previous run except earlier archives to run_dir/previous/<time>/."""
    entries = [p for p in run_dir.iterdir() if p.name != "previous"]
    if not entries:
        return None
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():  # two restarts within one second
        n += 1
        dest = dest.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    dest.mkdir(parents=True)
    for p in entries:
        shutil.move(str(p), str(dest / p.name))
    return dest


def _fmt(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def prepare_run_dir(cfg: Config, run_dir: Path, *, is_main: bool = True) -> bool:
    """Checks that `run_dir` may be used with `cfg` and records the config; True when the run should resume."""
    tc = cfg.train
    steps = checkpoint_steps(run_dir) if run_dir.is_dir() else []
    saved_path = run_dir / "config.yaml"
    if tc.resume == "never" and run_dir.is_dir():
        if is_main:
            dest = _archive(run_dir)
            if dest is not None:
                log.info("train.resume=never: the previous run in %s was moved to %s", run_dir, dest)
        steps = []
    elif tc.resume == "require" and not steps:
        raise ConfigError(f"train.resume=require: {run_dir} has no checkpoint to resume from")
    elif steps:
        if not saved_path.is_file():
            raise ConfigError(f"train.run_dir: {run_dir} has checkpoints but no config.yaml to check them against; "
                              "set train.resume=never to move them aside and start again")
        saved = yaml.safe_load(saved_path.read_text()) or {}
        refused, allowed = config_changes(saved, cfg)
        if refused:
            diffs = ", ".join(f"{k} ({_fmt(a)} -> {_fmt(b)})" for k, (a, b) in refused.items())
            raise ConfigError(
                f"train.run_dir: {run_dir} holds checkpoints of a run whose config differs in {diffs}; resuming "
                "would reinterpret them. Keep the saved values to resume, set train.resume=never to move the old "
                f"run to {run_dir}/previous/ and start again, or fine-tune in a new run_dir with "
                f"train.init_from={run_dir}")
        for k, (a, b) in allowed.items():
            log.info("resuming with a changed setting: %s %s -> %s", k, _fmt(a), _fmt(b))
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        saved_path.write_text(dump_config(cfg))
        info = {"git_commit": _git_commit(), "effarch_version": _version(), "jax_version": jax.__version__,
                "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return bool(steps)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version() -> str:
    try:
        return importlib.metadata.version("effarch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
