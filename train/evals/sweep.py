"""`effarch sweep SWEEP.yaml`: train every config of a grid in parallel processes, evaluate each run, keep the best.

A sweep file lists named base configs and a grid of overrides (a sweep is a list of configs; the file only
spells the list as a product):

    sweep_dir: runs/sweeps/mqar_zoology        # default runs/sweeps/<file stem>; --sweep-dir overrides it
    runs:                                      # name: the config files (+ overrides) of one model family
      attention: {configs: [configs/mqar/zoology_attention.yaml]}
      based: {configs: [configs/mqar/based.yaml], overrides: {optim.warmup_steps: 10}}
    configs: [configs/overlays/tiny.yaml]      # optional: applied after each run's own files
    overrides: {data.mixture: zoology_standard} # optional: every run, after the files
    grid: {model.d_model: [64, 128], optim.lr: [1.0e-3, 1.0e-2]}   # the cartesian product, applied last
    evals: {mqar: {}, perplexity: {max_examples: 100}}             # task: options, as `effarch eval` takes them
    select: {metric: mqar.accuracy, over: [optim.lr], mode: max}   # best of `over` per (run, other grid keys)

Each run goes to SWEEP_DIR/<run>-<key>=<value>-... and is one `python -m effarch.train.evals.sweep --worker RUN_DIR`
process (a fresh JAX per run; `--jobs` of them at a time, default os.cpu_count(); `--jobs 1` runs them one after
another in the sweep's own process), its output in RUN_DIR/sweep.log: train (the trainer resumes an
interrupted run from its checkpoints, `train.resume=auto`), then each eval. `sweep_done.json` marks a finished run,
which a rerun skips; `sweep_trained.json` marks finished training, so an interruption during the evals does not train
again. Then SWEEP_DIR gets sweep.json (every run and the best per group), table.md and, with an `mqar` eval and
matplotlib, mqar_accuracy_vs_state.png (Zoology's figure: accuracy against decode-state bytes).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from effarch.train.config import ConfigError, load_config, load_yaml
from effarch.train.evals import TASKS, options_to_argv, parse_options, plots
from effarch.train.evals.common import read_result

DONE, TRAINED, SPEC = "sweep_done.json", "sweep_trained.json", "sweep_spec.json"
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
                name = "-".join([run_name, *(f"{short[k]}={_fmt(v)}" for k, v in point.items())])
                run_dir = self.sweep_dir / name
                overrides = ["train.progress=false", *_as_overrides(self.overrides), *_as_overrides(run["overrides"]),
                             *_as_overrides(point), f"train.run_dir={run_dir}"]
                specs.append({"name": name, "run": run_name, "grid": point, "run_dir": str(run_dir),
                              "configs": [*run["configs"], *self.configs], "overrides": overrides,
                              "evals": self.evals})
        return specs


def _fmt(v) -> str:
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


# --- running ---------------------------------------------------------------------------------------------------


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(spec: dict) -> bool:
    done = _read(Path(spec["run_dir"]) / DONE)
    return done is not None and done.get("spec") == spec


def _write_spec(spec: dict) -> Path:
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    return run_dir


STOPPED = 4  # a run's exit status after SIGTERM / SIGINT: its checkpoint is saved, a rerun resumes it


class _Stop:
    """SIGTERM / SIGINT to the sweep: no new run starts, running workers get SIGTERM (each saves a checkpoint at its
    next step and exits with STOPPED); an in-process run's trainer catches the signal itself."""

    def __init__(self):
        self.event = threading.Event()
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.event.set()
        with self.lock:
            for proc in self.procs:
                proc.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _launch(spec: dict, env: dict, stop: _Stop) -> int:
    """One run in a worker process (a fresh JAX), its output appended to RUN_DIR/sweep.log; the exit status."""
    run_dir = _write_spec(spec)
    with open(run_dir / "sweep.log", "a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} worker start\n")
        log.flush()
        with stop.lock:
            if stop.event.is_set():
                return STOPPED
            proc = subprocess.Popen([sys.executable, "-m", "effarch.train.evals.sweep", "--worker", str(run_dir)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            stop.procs.add(proc)
        rc = proc.wait()
        with stop.lock:
            stop.procs.discard(proc)
    return rc


def _in_process(spec: dict) -> int:
    """One run in this process (`--jobs 1`: nothing runs beside it, so a fresh JAX per run would only cost time)."""
    run_dir = _write_spec(spec)
    logger = logging.getLogger("effarch")
    with open(run_dir / "sweep.log", "a") as log, contextlib.redirect_stdout(log):
        print(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} in-process start", flush=True)
        # The trainer's log lines (resumed from ..., config changes) go to the run's log, as from a worker.
        handler, level = logging.StreamHandler(log), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            return work(run_dir, configure_logging=False)
        except Exception:  # noqa: BLE001 - as a worker process would: this run failed, the sweep goes on
            traceback.print_exc(file=log)
            return 1
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def run_all(specs: list[dict], jobs: int, log=print) -> dict[str, str]:
    """Runs every unfinished spec; {name: "skipped" | "done" | "failed (rc N)" | "interrupted" | "not started"}.

    jobs > 1: that many worker processes at a time; jobs == 1: one after another in this process. After SIGTERM /
    SIGINT no new run starts; the runs that were going save a checkpoint and stop (rerun the sweep to resume them).
    """
    status = {}
    todo = []
    for spec in specs:
        if is_finished(spec):
            status[spec["name"]] = "skipped"
            log(f"sweep: {spec['name']}: finished earlier, skipped")
        else:
            todo.append(spec)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def timed(spec, stop):
        t0 = time.perf_counter()
        if stop.event.is_set():
            return None, 0.0
        rc = _in_process(spec) if jobs == 1 else _launch(spec, env, stop)
        if rc == STOPPED:
            stop.event.set()
        return rc, time.perf_counter() - t0

    def report(i, spec, rc, seconds):
        name = spec["name"]
        if rc is None:
            status[name] = "not started"
            return
        status[name] = {0: "done", STOPPED: "interrupted"}.get(rc, f"failed (rc {rc})")
        hint = {0: "", STOPPED: "; rerun the sweep to resume it"}.get(rc, f"; see {spec['run_dir']}/sweep.log")
        log(f"sweep: [{i}/{len(todo)}] {name}: {status[name]} in {seconds:.0f}s{hint}")

    with _Stop() as stop:
        if jobs == 1:
            for i, spec in enumerate(todo, 1):
                report(i, spec, *timed(spec, stop))
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(timed, spec, stop): spec for spec in todo}
                for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                    report(i, futures[fut], *fut.result())
    if stop.event.is_set():
        log("sweep: stopped by a signal; rerun the same command to resume")
    return status


def work(run_dir: Path, *, configure_logging: bool = True) -> int:
    """One run of a sweep: train unless already trained, then every eval; the exit status (0 when finished)."""
    from effarch.train.evals import run_eval
    from effarch.train.train import TrainingDiverged, train_and_evaluate

    if configure_logging:  # the worker process; in-process runs keep the caller's logging
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)
    spec = json.loads((run_dir / SPEC).read_text())
    train_spec = {"configs": spec["configs"], "overrides": spec["overrides"]}
    trained = _read(run_dir / TRAINED)
    try:
        if trained is None or trained.get("spec") != train_spec:
            cfg = load_config(spec["configs"], spec["overrides"])
            result = train_and_evaluate(cfg)
            if result.stopped_by not in ("steps", "accuracy"):  # a signal: the checkpoint is saved, not finished
                print(f"sweep worker: stopped by {result.stopped_by} at step {result.step}; rerun to resume")
                return STOPPED
            trained = {"spec": train_spec, "step": result.step, "stopped_by": result.stopped_by,
                       "train_wall_s": round(result.wall_time_s, 1)}
            (run_dir / TRAINED).write_text(json.dumps(trained, indent=2) + "\n")
        for task, argv in spec["evals"].items():
            result = run_eval(run_dir, task, argv, log=print)
            print(f"sweep worker: {task}: {json.dumps(result['summary'])}")
    except ConfigError as e:
        print(f"effarch: error: {e}")
        return 2
    except TrainingDiverged as e:
        print(f"effarch: error: {e}")
        return 3
    (run_dir / DONE).write_text(json.dumps({"spec": spec, "trained": trained}, indent=2) + "\n")
    return 0


# --- results ---------------------------------------------------------------------------------------------------


def collect(sweep: Sweep, specs: list[dict], status: dict[str, str] | None = None) -> dict:
    """Rows of every run (grid values, eval summaries, state bytes) and the best row per group."""
    rows = []
    for spec in specs:
        run_dir = Path(spec["run_dir"])
        trained = _read(run_dir / TRAINED) or {}
        row = {"name": spec["name"], "run": spec["run"], "grid": spec["grid"],
               "finished": is_finished(spec),
               "status": (status or {}).get(spec["name"]), "step": trained.get("step"),
               "stopped_by": trained.get("stopped_by"), "train_wall_s": trained.get("train_wall_s"), "evals": {}}
        for task in spec["evals"]:
            res = read_result(run_dir, task)
            if res is not None:
                row["evals"][task] = res["summary"]
                row.setdefault("model", res["model"])
                if task == "mqar":
                    row["mqar_segments"] = res["results"]
        row["metric"] = metric_of(row, sweep.metric)
        rows.append(row)
    best = {}
    for row in rows:
        if row["metric"] is None or not row["finished"]:
            continue
        group = (row["run"], *(json.dumps(v) for k, v in row["grid"].items() if k not in sweep.over))
        if group not in best or (row["metric"] > best[group]["metric"] if sweep.mode == "max"
                                 else row["metric"] < best[group]["metric"]):
            best[group] = row
    return {"sweep_file": str(sweep.path), "sweep_dir": str(sweep.sweep_dir), "metric": sweep.metric,
            "mode": sweep.mode, "over": list(sweep.over), "runs": rows, "best": list(best.values())}


def metric_of(row: dict, metric: str | None) -> float | None:
    if metric is None:
        return None
    task, key = metric.split(".", 1)
    value = row["evals"].get(task, {}).get(key)
    return float(value) if value is not None else None


def best_table(summary: dict) -> str:
    """Markdown: the best run of each group, its chosen `over` values, the metric and the MQAR segments."""
    over = summary["over"]
    rows = summary["best"]
    group_keys = [k for k in (rows[0]["grid"] if rows else {}) if k not in over]
    segs = list(rows[0].get("mqar_segments", {})) if rows else []
    head = ["run", *group_keys, *(f"best {k}" for k in over), summary["metric"] or "metric"]
    # The state column is at the longest test length: attention's KV cache grows with it, a recurrent state does not.
    longest = max(segs, key=lambda s: rows[0]["mqar_segments"][s]["seq_len"]) if segs else None
    head += segs + ([f"state bytes at {rows[0]['mqar_segments'][longest]['seq_len']}"] if segs else []) + ["steps"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["run"], *(_fmt(r["grid"][k]) for k in group_keys), *(_fmt(r["grid"][k]) for k in over),
                 f"{r['metric']:.4f}"]
        cells += [f"{r['mqar_segments'][s]['accuracy']:.4f}" for s in segs]
        if segs:
            cells.append(f"{r['mqar_segments'][longest]['state_bytes']:,}")
        cells.append(str(r["step"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(summary: dict) -> str:
    lines = ["| run dir | metric | steps | stopped by | train s | finished |", "|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        cells = ["—" if v is None else str(v) for v in (r["step"], r["stopped_by"], r["train_wall_s"])]
        metric = "—" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(f"| {r['name']} | {metric} | {' | '.join(cells)} | "
                     f"{'yes' if r['finished'] else r['status'] or 'no'} |")
    return "\n".join(lines)


def state_figure(summary: dict, path: str) -> None:
    """Zoology's figure from the best rows: accuracy per MQAR segment against decode-state bytes at its length."""
    panels = {}
    over = set(summary["over"])
    for r in summary["best"]:
        label = ",".join(_fmt(v) for k, v in r["grid"].items() if k not in over) or r["run"]
        for seg, res in r.get("mqar_segments", {}).items():
            title = f"seq {res['seq_len']}, {res['kv_pairs']} kv pairs"
            panels.setdefault(title, {}).setdefault(r["run"], []).append((res["state_bytes"], res["accuracy"], label))
    if not panels:
        raise ValueError("no finished run has an mqar eval to plot")
    plots.accuracy_vs_state(panels, path, title="MQAR accuracy vs decode-state bytes (best of "
                            f"{', '.join(summary['over']) or 'one run'})")


def finish(sweep: Sweep, specs: list[dict], status: dict[str, str] | None = None, log=print) -> dict:
    """Writes sweep.json, table.md and the PNG; returns the summary."""
    summary = collect(sweep, specs, status)
    summary["png"] = None
    if "mqar" in sweep.evals and summary["best"]:
        png = sweep.sweep_dir / "mqar_accuracy_vs_state.png"
        try:
            state_figure(summary, str(png))
            summary["png"] = png.name
        except plots.PlotsUnavailable as e:
            summary["png_skipped"] = str(e)
            log(f"sweep: {e}")
    text = (f"# sweep {sweep.path.name}: best of {', '.join(sweep.over) or 'each run'} by {sweep.metric} "
            f"({sweep.mode})\n\n{best_table(summary)}\n\n## every run\n\n{runs_table(summary)}\n")
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / "table.md").write_text(text)
    (sweep.sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["table"] = text
    return summary


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def main(argv: list[str]) -> int:
    """`effarch sweep`: 0 when every run finished, 1 when some failed (their logs are named)."""
    p = _Parser(prog="effarch sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep_file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (default: the CPU count)")
    p.add_argument("--sweep-dir", default=None, help="overrides the file's sweep_dir")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="only these named runs of the file")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their overrides, run nothing")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: write sweep.json, table.md and the PNG from the runs finished so far")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    sweep = load_sweep(args.sweep_file, args.sweep_dir)
    specs = sweep.runs_to_do()
    if args.only:
        unknown = sorted(set(args.only) - set(sweep.runs))
        if unknown:
            raise ConfigError(f"--only: unknown run(s) {unknown}; the sweep has {sorted(sweep.runs)}")
        specs = [s for s in specs if s["run"] in args.only]
    if args.dry_run:
        for s in specs:
            print(f"{s['name']}: {' '.join(Path(c).name for c in s['configs'])} {' '.join(s['overrides'][1:-1])}")
        return 0
    if args.collect:
        status = {s["name"]: "skipped" if is_finished(s) else "not started" for s in specs}
    else:
        print(f"sweep: {len(specs)} runs in {sweep.sweep_dir}, {args.jobs} at a time", file=sys.stderr)
        status = run_all(specs, args.jobs, log=lambda s: print(s, file=sys.stderr))
    summary = finish(sweep, specs, status, log=lambda s: print(s, file=sys.stderr))
    print(summary["table"])
    print(f"sweep: results in {sweep.sweep_dir}/sweep.json, table.md"
          + (f", {summary['png']}" if summary["png"] else ""), file=sys.stderr)
    if args.collect:
        return 0
    return 0 if all(v in ("done", "skipped") for v in status.values()) else 1  # failed, interrupted or not started


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"] and len(sys.argv) == 3:
        sys.exit(work(Path(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))

