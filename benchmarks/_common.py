"""Helpers shared by the benchmark scripts: compiled memory, timing, the loss whose gradient is timed, output.

The scripts run as `python benchmarks/<name>.py`, which puts this folder first on sys.path, so they import this
module as `_common` (the smoke tests under tests/benchmarks/ put the folder on sys.path the same way).
"""

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp


def memory_stats(compiled) -> dict[str, int]:
    """XLA's compiled memory analysis (CPU has no device memory statistics); peak = arguments + outputs +
    temporaries - aliased (donated) bytes."""
    stats = compiled.memory_analysis()
    out = {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    return out


def time_calls(fn: Callable, args, warmup: int, reps: int) -> list[float]:
    """Wall seconds of `reps` calls of fn(*args), each waited for, after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def loss_and_grads(attn: Callable) -> Callable:
    """(q, k, v, cotangent) -> (<attn(q, k, v), cotangent>, (dq, dk, dv)): one forward + backward of an op."""

    def loss(q, k, v, cotangent):
        return jnp.sum(attn(q, k, v) * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def depth_heatmap(report: dict, path: str, depth_label: str = "depth") -> None:
    """One panel per model or path of report["results"][name][str(length)]["by_depth"][str(depth)] (exact-match
    accuracy) over report["config"]["lengths"] x ["depths"], written as a PNG (matplotlib, the `plots` extra).
    The drawing is `effarch.train.evals.plots.depth_heatmap`, shared with `effarch eval RUN_DIR passkey|niah`."""
    from effarch.train.evals.plots import depth_heatmap as draw

    draw(report["results"], report["config"]["lengths"], report["config"]["depths"], path, depth_label=depth_label)


class PipeWorker:
    """A script run by another Python (e.g. a venv with torch), driven one JSON line at a time over a pipe: its
    first stdout line is an info dict (`.info`), then it answers each command line with one JSON line."""

    def __init__(self, python: str, script: str, *args, name: str = "worker"):
        self.name = name
        self.proc = subprocess.Popen([python, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} exited with code {self.proc.wait()} (see its stderr above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


def emit(report: dict, out: str | None) -> dict:
    """Prints the JSON report to stdout and, with `out`, writes it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return report
