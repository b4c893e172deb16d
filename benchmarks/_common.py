"""Helpers shared by the benchmark scripts: the (path, point) sweep, compiled memory, timing, load gating, the loss
whose gradient is timed, output.

The scripts run as `python benchmarks/<name>.py`, which puts this folder first on sys.path, so they import this
module as `_common` (the smoke tests under tests/benchmarks/ put the folder on sys.path the same way).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from effarch.train.host_malloc import env_for_subprocess, retain_freed_memory

# Every benchmark process keeps freed host memory (train/host_malloc.py: XLA's CPU runtime would otherwise page-fault
# each call's temporaries back in), as `effarch` does; peers run with and without it (`peer_allocators`). Runs at
# import, before JAX starts its threads; recorded in each report's "load" entry as "host_malloc" (None: not applied).
HOST_MALLOC = retain_freed_memory()


def sweep(
    paths: Sequence[str],
    points: Sequence[Hashable],
    measure: Callable[[str, Hashable], dict],
    *,
    log: Callable[[str], None] | None = None,
    line: Callable[[str, Hashable, dict], str] | None = None,
) -> dict[str, dict]:
    """results[path][point] = measure(path, point), every point of the first path, then of the next; after each
    record, log(line(path, point, record)) when both are given."""
    results: dict[str, dict] = {}
    for path in paths:
        results[path] = {}
        for point in points:
            record = measure(path, point)
            results[path][point] = record
            if log is not None and line is not None:
                log(line(path, point, record))
    return results


def by_str(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """A sweep's results with the points as strings (JSON object keys)."""
    return {path: {str(point): r for point, r in per_point.items()} for path, per_point in results.items()}


def skipped(results: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{path: {point: why}} of the records `compile_and_time` did not run (past the memory cap)."""
    return {path: {str(point): r["skipped"] for point, r in per_point.items() if "skipped" in r}
            for path, per_point in results.items()}


def platform_info() -> dict[str, str]:
    """The backend, the first device and the jax version, for a report's config."""
    return {"platform": jax.default_backend(), "device": str(jax.devices()[0]), "jax_version": jax.__version__}


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The host's CPU as /proc/cpuinfo names it: model name, family/model numbers, the widest vector instructions and
    the core count. Timings from CPUs that differ here are not comparable (an AVX2-only Zen 3 ran the 2048^3 float32
    matmul at ~150 GFLOP/s, the machine of earlier runs at 250-270; benchmarks/README.md), and even one CPU model
    drifts between days (the same Zen 3 kind ran it at 52-75 on another day): only ratios within one run are."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cores": os.cpu_count()}
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name"), "family": fields.get("cpu family"), "model": fields.get("model"),
            "vector_isa": [isa for isa in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if isa in flags],
            "cores": os.cpu_count()}


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


def compile_and_time(fn: Callable, args, *, warmup: int, reps: int, max_temp_bytes: int | None = None) -> dict:
    """Compiles jit(fn) at args (compile_s, memory) and times `reps` calls (median_s, times_s). Past the cap on the
    compiled temporaries, "skipped" (why) replaces the timings: the memory numbers are still reported."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    record = {"compile_s": time.perf_counter() - start, "memory": memory_stats(compiled)}
    if max_temp_bytes is not None and record["memory"]["temp_bytes"] > max_temp_bytes:
        record["skipped"] = (
            f"compiled temporaries {record['memory']['temp_bytes'] / 2**30:.2f} GiB exceed the cap "
            f"{max_temp_bytes / 2**30:.2f} GiB; not run"
        )
        return record
    times = time_calls(compiled, args, warmup, reps)
    record.update(median_s=statistics.median(times), times_s=times)
    return record


def time_decode_steps(layer: nnx.Module, state, x_t, *, warmup: int, steps: int) -> tuple[list[float], float | None]:
    """Wall seconds of `steps` calls of the layer's jitted decode_step after `warmup` untimed ones, and the first
    call's seconds (compilation included; None without warmup). The state is donated and fed back, so XLA updates
    a KV cache in place, as a serving loop would."""
    graphdef, params = nnx.split(layer)

    def step(state, params, x_t):
        return nnx.merge(graphdef, params).decode_step(state, x_t)

    step = jax.jit(step, donate_argnums=0)
    first_call_s = None
    for i in range(warmup):
        start = time.perf_counter()
        state, y = step(state, params, x_t)
        jax.block_until_ready(y)
        if i == 0:
            first_call_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, y = step(state, params, x_t)
        jax.block_until_ready((state, y))
        times.append(time.perf_counter() - start)
    return times, first_call_s


def _busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat's first line), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    """CPU seconds of this process, its finished children and its live children (a PipeWorker's Python, whose time
    os.times() counts only once it exits)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _live_children_s()


def _live_children_s() -> float:
    me, total = str(os.getpid()), 0.0
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; then utime, stime at fields 11, 12 (after the name)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class OtherLoad:
    """How busy the rest of the machine was while a `with` block ran: the CPU seconds other processes used (busy
    time from /proc/stat minus this process's and its children's own CPU time) per second of wall time, in cores.

    The load average cannot say this: on a 2-core host a benchmark's own threads hold it near 2. A measurement
    is quiet when `cores` stays well under one core (QUIET_BELOW); `cores` is None where /proc/stat is missing.
    """

    QUIET_BELOW = 0.25

    def __enter__(self) -> "OtherLoad":
        self.cores = None
        self._start = (time.perf_counter(), _busy_s(), _own_s())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        busy1 = _busy_s()
        if busy0 is not None and busy1 is not None:
            wall = max(time.perf_counter() - wall0, 1e-9)
            self.cores = max(0.0, (busy1 - busy0) - (_own_s() - own0)) / wall

    @property
    def quiet(self) -> bool | None:
        return None if self.cores is None else self.cores < self.QUIET_BELOW


class LoadGate:
    """The 1-minute load average before and after a benchmark, and the rule that a loaded machine gives no target
    verdict. Numbers measured while loaded are still reported, marked "loaded" (`stamp`), and a target's pass/fail
    becomes "loaded" (`verdict`), never "pass".

    `loaded`: the reading before is above LIMIT, or the reading after is and other processes were busy during the
    run. The load average counts this benchmark's own threads (and its peer workers') too, so a 2-thread benchmark
    on a quiet 2-core machine ends near 2 whatever else runs; an `OtherLoad` measured over the whole run (CPU time of
    everything but this process and its children, in cores) tells whether that "after" is someone else's: it is
    when the others used `OtherLoad.QUIET_BELOW` cores or more, or when /proc/stat cannot say.

    Made before the first timed call; `stamp(report)` reads the load again at the end.
    """

    LIMIT = 1.5
    TARGET_KEYS = ("pass", "meets_target", "verdict")  # the keys under which benchmarks here report a target's result

    def __init__(self, loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
                 other: "OtherLoad | None" = None):
        self._loadavg = loadavg
        self.before = float(loadavg()[0])
        self.after: float | None = None
        self._other = (other if other is not None else OtherLoad()).__enter__()
        self.other_cores: float | None = None

    @property
    def loaded(self) -> bool:
        if self.before > self.LIMIT:
            return True
        if self.after is None or self.after <= self.LIMIT:
            return False
        return self.other_cores is None or self.other_cores >= OtherLoad.QUIET_BELOW

    def verdict(self, passed):
        """A target's result as reported: "loaded" on a loaded machine, else `passed` unchanged."""
        return "loaded" if self.loaded else passed

    def record(self) -> dict:
        return {"load_1m_before": self.before, "load_1m_after": self.after, "limit": self.LIMIT,
                "other_processes_cores": self.other_cores, "loaded": self.loaded}

    def stamp(self, report: dict) -> dict:
        """Reads the load after, adds report["load"] (with the host_malloc settings and `host_cpu()`) and, when
        loaded, replaces every target result in the report (a TARGET_KEYS entry at any depth, or a boolean directly
        under a "targets" key) by "loaded", except in a dict marked "load_free": True (a FLOP count or a
        compiled-memory bound, which load cannot change); a line on stderr says so. Returns the report."""
        self.after = float(self._loadavg()[0])
        self._other.__exit__(None, None, None)
        self.other_cores = self._other.cores
        report["load"] = {**self.record(), "host_malloc": HOST_MALLOC, "cpu": host_cpu()}
        if self.loaded:
            _replace_verdicts(report, self.TARGET_KEYS)
            others = "?" if self.other_cores is None else f"{self.other_cores:.2f}"
            print(f"LOADED: load average {self.before:.2f} before, {self.after:.2f} after (> {self.LIMIT}), other "
                  f"processes {others} cores: the numbers only show the benchmark works; no target verdict",
                  file=sys.stderr)
        return report


def _replace_verdicts(node, keys: Sequence[str], in_targets: bool = False) -> None:
    """Every `keys` entry, and every boolean directly in a "targets" dict, becomes "loaded"."""
    if isinstance(node, dict):
        if node.get("load_free") is True:
            return
        for key, value in node.items():
            if (key in keys or (in_targets and isinstance(value, bool))) and not isinstance(value, (dict, list)):
                node[key] = "loaded"
            else:
                _replace_verdicts(value, keys, key == "targets")
    elif isinstance(node, list):
        for item in node:
            _replace_verdicts(item, keys)


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


def peer_allocators(choice: str = "both") -> dict[str, dict[str, str]]:
    """{worker-name suffix: environment} for a peer's worker processes: glibc's default allocator ("default"), the
    host_malloc settings this process runs with ("host"; the default allocator where none were applied), or one worker
    of each ("both"), so a ratio against the faster of them never credits us with an allocator setting the peer was
    denied."""
    default = {"": {}}
    host = {"_host_malloc": env_for_subprocess(HOST_MALLOC)} if HOST_MALLOC else default
    return {"default": default, "host": host, "both": {**default, **host}}[choice]


def interleave(calls: dict[str, Callable], *, reps: int, warmup: int, burst: int = 1,
               on_reply: Callable[[str, dict], None] | None = None) -> dict[str, list[float]]:
    """{name: seconds of each timed call}: `warmup + reps` rounds over `calls` in order (a load spike hits every path
    alike), each path called `burst` times in a row per round and the last call timed. A call returning a dict is a
    PipeWorker's reply, timed by the worker itself (its "seconds", leaving out the pipe round trip), and also handed
    to `on_reply(name, reply)`."""
    times = {name: [] for name in calls}
    for rep in range(warmup + reps):
        for name, call in calls.items():
            for _ in range(burst - 1):  # untimed: this path's threads and caches are warm again
                call()
            start = time.perf_counter()
            reply = call()
            elapsed = time.perf_counter() - start
            if isinstance(reply, dict):
                elapsed = reply["seconds"]
                if on_reply is not None:
                    on_reply(name, reply)
            if rep >= warmup:
                times[name].append(elapsed)
    return times


class PipeWorker:
    """A script run by another Python (e.g. a venv with torch), driven one JSON line at a time over a pipe: its
    first stdout line is an info dict (`.info`), then it answers each command line with one JSON line."""

    def __init__(self, python: str, script: str, *args, name: str = "worker", env: dict[str, str] | None = None):
        self.name = name
        self.proc = subprocess.Popen([python, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
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
