"""The sweep file of `effarch sweep` (train/evals/sweep.py): read, check and expand it into one spec per run.

A sweep is a list of configs; the file only spells the list as a product:

    sweep_dir: runs/sweeps/mqar_zoology        # default runs/sweeps/<file stem>; --sweep-dir overrides it
    runs:                                      # name: the config files (+ overrides) of one model family
      attention: {configs: [configs/mqar/zoology_attention.yaml]}
      based: {configs: [configs/mqar/based.yaml], overrides: {optim.warmup_steps: 10}}
    configs: [configs/overlays/tiny.yaml]      # optional: applied after each run's own files
    overrides: {data.mqar.mixture: zoology_standard} # optional: every run, after the files
    grid: {model.d_model: [64, 128], optim.lr: [1.0e-3, 1.0e-2]}   # the cartesian product, applied last
    evals: {mqar: {}, perplexity: {max_examples: 100}}             # task: options, as `effarch eval` takes them
    select: {metric: mqar.accuracy, over: [optim.lr], mode: max}   # best of `over` per (run, other grid keys)

Each (run, grid point) becomes a spec (`Sweep.runs_to_do`): its name `<run>-<key>=<value>-...`, its run directory
SWEEP_DIR/<name>, its config files and overrides and its evals. Every run's config is loaded here, so a bad key or
value is reported before anything trains.
"""

import dataclasses
import itertools
import json
from pathlib import Path

from effarch.train.config import ConfigError, load_config, load_yaml
from effarch.train.evals import TASKS, options_to_argv, parse_options

LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_token", "bits_per_byte"}  # the default select.mode is min
TOP_KEYS = {"sweep_dir", "runs", "configs", "overrides", "grid", "evals", "select"}


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: Path
    sweep_dir: Path
    runs: dict[str, dict]  # name -> {"configs": [abs paths], "overrides": {key: value}}
    configs: tuple[str, ...]
    overrides: dict
    grid: dict[str, list]
    evals: dict[str, list[str]]  # task -> argv
    metric: str | None  # "task.summary_key"; None without evals
    over: tuple[str, ...]
    mode: str  # "max" or "min"

    def runs_to_do(self) -> list[dict]:
        """One spec per (run, grid point): name, run, grid values, config files, overrides, evals."""
        keys = list(self.grid)
        short = _short_names(keys)
        specs = []
        for run_name, run in self.runs.items():
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values, strict=True))
                name = "-".join([run_name, *(f"{short[k]}={fmt_value(v)}" for k, v in point.items())])
                run_dir = self.sweep_dir / name
                overrides = ["train.progress=false", *_as_overrides(self.overrides), *_as_overrides(run["overrides"]),
                             *_as_overrides(point), f"train.run_dir={run_dir}"]
                specs.append({"name": name, "run": run_name, "grid": point, "run_dir": str(run_dir),
                              "configs": [*run["configs"], *self.configs], "overrides": overrides,
                              "evals": self.evals})
        return specs


def fmt_value(v) -> str:
    """A grid value as it appears in run names and tables (strings bare, everything else as JSON)."""
    return json.dumps(v) if not isinstance(v, str) else v


def _as_overrides(values: dict) -> list[str]:
    # JSON is YAML, so the trainer's override parser reads back exactly these values.
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last component of each dotted key, or the whole key where two grid keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _mapping(value, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _config_files(value, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of config file paths, got {value!r}")
    for i, f in enumerate(value):
        if not Path(f).is_file():
            raise ConfigError(f"{key}[{i}]: config file {f!r} does not exist (paths are relative to the current "
                              "directory)")
    return [str(Path(f).resolve()) for f in value]


def load_sweep(path: str | Path, sweep_dir: str | Path | None = None) -> Sweep:
    """Reads and checks a sweep file: every run's config must load, every eval's options must parse."""
    path = Path(path)
    raw = load_yaml(path)
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a sweep file has {sorted(TOP_KEYS)}")
    runs_raw = _mapping(raw.get("runs"), "runs")
    if not runs_raw:
        raise ConfigError("runs: list at least one named run, e.g. runs: {attention: {configs: [a.yaml]}}")
    runs = {}
    for name, run in runs_raw.items():
        run = _mapping(run, f"runs.{name}")
        bad = sorted(set(run) - {"configs", "overrides"})
        if bad:
            raise ConfigError(f"runs.{name}: unknown key(s) {bad}; a run has configs and overrides")
        if not str(name).replace("_", "").isalnum():
            raise ConfigError(f"runs.{name}: a run name is letters, digits and underscores (it names directories)")
        runs[str(name)] = {"configs": _config_files(run.get("configs"), f"runs.{name}.configs"),
                           "overrides": _mapping(run.get("overrides"), f"runs.{name}.overrides")}
    grid = _mapping(raw.get("grid"), "grid")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid.{k}: expected a non-empty list of values, got {v!r}")
    evals = {}
    for task, options in _mapping(raw.get("evals"), "evals").items():
        if task not in TASKS:
            raise ConfigError(f"evals.{task}: unknown eval task; tasks: {', '.join(TASKS)}")
        argv = options_to_argv(_mapping(options, f"evals.{task}"))
        try:
            parse_options(task, argv)
        except ConfigError as e:
            raise ConfigError(f"evals.{task}: {e}") from None
        evals[task] = argv
    select = _mapping(raw.get("select"), "select")
    bad = sorted(set(select) - {"metric", "over", "mode"})
    if bad:
        raise ConfigError(f"select: unknown key(s) {bad}; select has metric, over and mode")
    metric = select.get("metric")
    if metric is None and evals:
        metric = f"{next(iter(evals))}.accuracy" if next(iter(evals)) != "perplexity" else "perplexity.loss"
    if metric is not None and (not isinstance(metric, str) or metric.split(".", 1)[0] not in evals
                               or "." not in metric):
        raise ConfigError(f"select.metric: expected TASK.KEY with TASK one of the sweep's evals {list(evals)}, "
                          f"got {metric!r}")
    over = select.get("over", [])
    if not isinstance(over, list) or any(k not in grid for k in over):
        raise ConfigError(f"select.over: expected a list of grid keys {list(grid)}, got {over!r}")
    lower_is_better = metric is not None and metric.split(".", 1)[1] in LOWER_IS_BETTER
    mode = select.get("mode", "min" if lower_is_better else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"select.mode: expected max or min, got {mode!r}")
    if sweep_dir is None:
        sweep_dir = raw.get("sweep_dir") or f"runs/sweeps/{path.stem}"
    sweep = Sweep(path=path, sweep_dir=Path(sweep_dir).resolve(), runs=runs,
                  configs=tuple(_config_files(raw.get("configs"), "configs")),
                  overrides=_mapping(raw.get("overrides"), "overrides"), grid=grid, evals=evals, metric=metric,
                  over=tuple(over), mode=mode)
    for spec in sweep.runs_to_do():  # every config error now, before anything trains
        try:
            load_config(spec["configs"], spec["overrides"])
        except ConfigError as e:
            raise ConfigError(f"{path}: run {spec['name']}: {e}") from None
    return sweep
