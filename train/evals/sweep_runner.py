"""Running the specs of a sweep (train/evals/sweep_spec.py): each run trains, then evaluates, in its own directory.

Each run is one `python -m effarch.train.evals.sweep --worker RUN_DIR` process (a fresh JAX per run; `--jobs` of them
at a time; `--jobs 1` runs them one after another in the sweep's own process), its output in RUN_DIR/sweep.log: train
(the trainer resumes an interrupted run from its checkpoints, `train.resume=auto`), then each eval. Markers in the run
directory, each holding the spec it was written for (a marker of another spec does not count):
- sweep_spec.json: the spec the worker runs;
- sweep_trained.json: training finished, so an interruption during the evals does not train again;
- sweep_done.json: the run finished (trained and evaluated); a rerun of the sweep skips it.
SIGTERM / SIGINT to the sweep starts no new run; the running ones save a checkpoint and stop (exit status STOPPED).
"""

import concurrent.futures
import contextlib
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

from effarch.train.config import ConfigError, load_config

DONE, TRAINED, SPEC = "sweep_done.json", "sweep_trained.json", "sweep_spec.json"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(spec: dict) -> bool:
    done = read_json(Path(spec["run_dir"]) / DONE)
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
            earlier = (read_json(Path(spec["run_dir"]) / DONE) or {}).get("spec")
            if isinstance(earlier, dict):
                changed = sorted(k for k in set(spec) | set(earlier) if spec.get(k) != earlier.get(k))
                log(f"sweep: {spec['name']}: finished earlier with other {', '.join(changed)}; running it again")
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
    trained = read_json(run_dir / TRAINED)
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
