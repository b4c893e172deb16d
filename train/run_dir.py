"""A run directory is the user's work: decide whether a new start may resume it, and never discard it.

`resolve_run_dir` and `check_run_dir` run first: an empty `train.run_dir` is an error (it would be the current
directory), `~` is expanded, and an existing directory that holds other things than effarch's files and no run
(no run_info.json, metrics.jsonl or checkpoints/) is refused, so a run is never started over someone's work.
Then the training takes the directory's lock (train/run_lock.py) and `prepare_run_dir` decides:
- The saved `config.yaml` binds only once the run has a checkpoint. A run that failed before its first checkpoint
  (a bad data path, a model that would not build) left nothing to protect, so a corrected config simply replaces it.
- With checkpoints, `train.resume` decides. "auto" / "require" resume, but first compare the saved resolved config
  with the new one: a change that would make the checkpoint's trees or the data order mean something else (model,
  optimizer, batch size, data, seed, freeze patterns) is refused with one line naming every differing key;
  harmless ones (step count, cadences, evaluation sets, mesh, dtype, kernel choice) are allowed and logged.
  "never" moves what effarch wrote of the old run (`RUN_FILES`: checkpoints, metrics, config, tb, eval, ...) to
  `previous/<time>/`, says so, and starts from step 0; anything else in the directory stays where it is.
"""

import dataclasses
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
from effarch.train.run_lock import LOCK_NAME

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


# What a training run writes into its run directory (the files `resume=never` moves aside), and what else effarch
# keeps there (the lock, a sweep's bookkeeping, earlier runs): anything outside both sets is the user's.
RUN_FILES = ("config.yaml", "run_info.json", "metrics.jsonl", "tb", "checkpoints", "checkpoints_unreadable", "eval",
             "init_report.json")
KEPT_FILES = (LOCK_NAME, "previous", "sweep_spec.json", "sweep_trained.json", "sweep_done.json", "sweep.log")
RUN_MARKERS = ("run_info.json", "metrics.jsonl", "checkpoints")  # a directory with one of these is a run


def resolve_run_dir(value: str) -> Path:
    """`train.run_dir` as a path: `~` expanded; ConfigError when empty (that would be the current directory)."""
    if not str(value).strip():
        raise ConfigError("train.run_dir is empty; name the run's own directory, e.g. train.run_dir=runs/my_run")
    return Path(str(value)).expanduser()


def check_run_dir(run_dir: Path) -> None:
    """ConfigError (one line) unless `run_dir` is new, empty, or a run directory."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"train.run_dir: {run_dir} exists and is not a directory")
    names = {p.name for p in run_dir.iterdir()}
    foreign = sorted(names - set(RUN_FILES) - set(KEPT_FILES))
    if foreign and not names & set(RUN_MARKERS):
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ConfigError(f"train.run_dir: {run_dir} is not a run directory (it holds {', '.join(foreign[:3])}{more}"
                          "); choose a new or empty directory")


def _archive(run_dir: Path) -> tuple[Path | None, list[str]]:
    """Moves the previous run's `RUN_FILES` to run_dir/previous/<time>/: (destination, names moved)."""
    entries = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not entries:
        return None, []
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():  # two restarts within one second
        n += 1
        dest = dest.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    dest.mkdir(parents=True)
    for p in entries:
        shutil.move(str(p), str(dest / p.name))
    return dest, [p.name for p in entries]


@dataclasses.dataclass
class Prepared:
    """What `prepare_run_dir` found: whether there are checkpoints to resume, the harmless settings that changed
    ({key: (saved, new)}), and where `resume=never` moved the previous run (None: nothing moved)."""

    resume: bool
    changed: dict
    archived: Path | None = None


def _fmt(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def prepare_run_dir(cfg: Config, run_dir: Path, *, is_main: bool = True) -> Prepared:
    """Checks that `run_dir` may be used with `cfg` and records the config (run the checks of `check_run_dir` and
    take the run's lock first)."""
    tc = cfg.train
    steps = checkpoint_steps(run_dir) if run_dir.is_dir() else []
    saved_path = run_dir / "config.yaml"
    changed, archived = {}, None
    if tc.resume == "never" and run_dir.is_dir():
        if is_main:
            archived, moved = _archive(run_dir)
            if archived is not None:
                others = sorted(set(p.name for p in run_dir.iterdir()) - {"previous", *KEPT_FILES})
                kept = f"; left in place: {', '.join(others)}" if others else ""
                log.info("train.resume=never: moved the previous run's %s to %s%s", ", ".join(moved), archived, kept)
        steps = []
    elif tc.resume == "require" and not steps:
        raise ConfigError(f"train.resume=require: {run_dir} has no checkpoint to resume from")
    elif steps:
        if not saved_path.is_file():
            raise ConfigError(f"train.run_dir: {run_dir} has checkpoints but no config.yaml to check them against; "
                              "set train.resume=never to move them aside and start again")
        saved = yaml.safe_load(saved_path.read_text()) or {}
        refused, changed = config_changes(saved, cfg)
        if refused:
            diffs = ", ".join(f"{k} ({_fmt(a)} -> {_fmt(b)})" for k, (a, b) in refused.items())
            raise ConfigError(
                f"train.run_dir: {run_dir} holds checkpoints of a run whose config differs in {diffs}; resuming "
                "would reinterpret them. Keep the saved values to resume, set train.resume=never to move the old "
                f"run to {run_dir}/previous/ and start again, or fine-tune in a new run_dir with "
                f"train.init_from={run_dir}")
        for k, (a, b) in changed.items():
            log.info("resuming with a changed setting: %s %s -> %s", k, _fmt(a), _fmt(b))
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        saved_path.write_text(dump_config(cfg))
        info = {"git_commit": _git_commit(), "effarch_version": _version(), "jax_version": jax.__version__,
                "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return Prepared(bool(steps), changed, archived)


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
