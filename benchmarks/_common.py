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
    accuracy) over report["config"]["lengths"] x ["depths"], written as a PNG (matplotlib, the `plots` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(report["results"])
    lengths, depths = report["config"]["lengths"], report["config"]["depths"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        grid = np.array([[report["results"][name][str(t)]["by_depth"][str(d)] for t in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(t) for t in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel(depth_label)
        ax.set_title(name)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")


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
