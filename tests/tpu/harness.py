"""Runs TPU compile jobs in a child process and reports each one's outcome, surviving libtpu aborts.

With the `libtpu` wheel installed, `jax.experimental.topologies.get_topology_desc` describes a TPU slice that is not
there, and `jax.jit(f).lower(*specs).compile()` runs XLA's TPU compiler and Mosaic's backend passes for it from a CPU
host (`JAX_PLATFORMS=cpu`). A compiler bug can abort the whole process (a failed C++ CHECK raises SIGABRT, with no
Python exception), so the jobs run in a child process:

- The parent writes the jobs (`Job`: a name, a `module:function` target, JSON keyword arguments) to a file and starts
  `python -m tests.tpu.harness JOBS RESULTS`. The child records "started i" before job i and "done i" with its outcome
  after it, one JSON line each, flushed, so whatever kills it, the parent knows which job was running.
- Many jobs share one child (starting JAX and libtpu costs ~3 s; a kernel compiles in 0.3-4 s, a small model's
  training step in 6-20 s). When the child dies
  by a signal, the running job is reported with the signal (and the last "Check failed" line libtpu wrote on
  stderr), and a fresh child runs the jobs after it. A job running longer than `job_timeout_s` is killed the same way.
- A job passes when its function returns; an exception is reported by its type and first line.
"""

import dataclasses
import functools
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The 4-chip slice the tests compile for, by chip generation.
SLICES: dict[str, str] = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: `target` ("package.module:function") is called with `kwargs` in the child; it passes if it
    returns. `name` says what is compiled (mixer or kernel, chip, shape, dtype): failure messages start with it."""

    name: str
    target: str
    kwargs: dict = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    status: str  # "ok", "error" (an exception), "signal" (the process died), "timeout"
    message: str = ""  # the exception's type and first line, or the signal and libtpu's last check failure
    seconds: float = 0.0  # wall time of the job in its child process
    cpu_seconds: float = 0.0  # the child's CPU time (all threads) during the job: steadier than wall on a busy host

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __str__(self) -> str:
        return f"{self.name}: {self.status}" + (f": {self.message}" if self.message else "")


@functools.cache
def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of TPU slice `topology` ("v5p:2x2x1"; a generation "v5p" means its `SLICES` entry), as
    `effarch plan` describes it (train/plan.py: chip configuration and hosts as on real slices). Needs libtpu."""
    from effarch.train.plan import parse_topology, topology_devices

    return topology_devices(parse_topology(SLICES.get(topology, topology), num_slices))


def first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:400]}"


def _stderr_hint(path: Path) -> str:
    """The last line of a dead child's stderr that explains it: libtpu's "Check failed" (or a fatal F-log line),
    else the last non-empty line."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "Check failed" in line:
            return line[line.index("Check failed"):][:400]
        if re.match(r"F\d{4} ", line):  # a fatal glog line: drop its date, thread and source prefix
            return line.split("] ", 1)[-1][:400]
    return lines[-1][:400] if lines else ""


def _read_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the child's death
            break
    return records


def run_jobs(jobs: Sequence[Job], *, job_timeout_s: float = 300.0, env: dict | None = None) -> dict[str, Result]:
    """Runs `jobs` in as few child processes as their failures allow; returns {job name: Result} for every job.

    `env`: variables added to this process's for the children. A job silent for `job_timeout_s` is killed."""
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    # No chip is used: ALLOW_MULTIPLE_LIBTPU_LOAD lets two harnesses (xdist workers, other checkouts) load libtpu at
    # once, where its lockfile would make the second fail.
    child_env = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    # Compile the kernels themselves, never their interpret mode (pallas_kernels/interpret.py).
    child_env.pop("EFFARCH_PALLAS_INTERPRET", None)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH")]))
    results: dict[str, Result] = {}
    pending = list(jobs)
    with tempfile.TemporaryDirectory(prefix="effarch-tpu-compile-") as tmp:
        tmp = Path(tmp)
        for attempt in range(len(jobs)):
            if not pending:
                break
            jobs_file, results_file, err_file = (tmp / f"{name}{attempt}" for name in ("jobs", "results", "stderr"))
            jobs_file.write_text(json.dumps([dataclasses.asdict(job) for job in pending]))
            results_file.touch()
            with open(err_file, "w") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.tpu.harness", str(jobs_file), str(results_file)],
                    cwd=REPO, env=child_env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                )
                # The clock restarts at each record: it times the child's start, then each job.
                seen, since, killed = 0, time.monotonic(), False
                while proc.poll() is None:
                    time.sleep(0.05)
                    count = len(_read_records(results_file))
                    if count != seen:
                        seen, since = count, time.monotonic()
                    elif time.monotonic() - since > job_timeout_s:
                        proc.kill()
                        proc.wait()
                        killed = True
            records = _read_records(results_file)
            done = {r["done"]: r for r in records if "done" in r}
            for i, record in sorted(done.items()):
                results[pending[i].name] = Result(pending[i].name, record["status"], record["message"],
                                                  record["seconds"], record["cpu_seconds"])
            started = [r["started"] for r in records if "started" in r]
            dead = started[-1] if started and started[-1] not in done else None
            if dead is None:
                if len(done) == len(pending):
                    break
                if done:  # died between two jobs: the next child takes the rest
                    pending = pending[len(done):]
                    continue
                # The child failed before its first job (e.g. at import): report every job left, do not retry.
                message = (f"compile harness killed after {job_timeout_s:.0f} s without starting a job" if killed
                           else f"compile harness exited with code {proc.returncode}: {_stderr_hint(err_file)}")
                for job in pending[len(done):]:
                    results[job.name] = Result(job.name, "error", message)
                break
            job = pending[dead]
            if killed:
                results[job.name] = Result(job.name, "timeout", f"killed after {job_timeout_s:.0f} s", job_timeout_s)
            elif proc.returncode < 0:
                sig = signal.Signals(-proc.returncode).name
                results[job.name] = Result(job.name, "signal", f"process killed by {sig}: {_stderr_hint(err_file)}",
                                           round(time.monotonic() - since, 3))
            else:
                results[job.name] = Result(
                    job.name, "error", f"process exited with code {proc.returncode}: {_stderr_hint(err_file)}",
                    round(time.monotonic() - since, 3))
            pending = pending[dead + 1:]
    return results


def _child(jobs_file: str, results_file: str) -> None:
    jobs = [Job(**job) for job in json.loads(Path(jobs_file).read_text())]
    with open(results_file, "a") as out:
        def record(**fields):
            out.write(json.dumps(fields) + "\n")
            out.flush()

        for i, job in enumerate(jobs):
            record(started=i)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                module, function = job.target.split(":")
                getattr(importlib.import_module(module), function)(**job.kwargs)
                status, message = "ok", ""
            except Exception as e:  # reported, not raised: the next job runs
                status, message = "error", first_line(e)
                traceback.print_exc()
            record(done=i, status=status, message=message, seconds=round(time.perf_counter() - start, 3),
                   cpu_seconds=round(time.process_time() - cpu_start, 3))


if __name__ == "__main__":
    _child(*sys.argv[1:])
