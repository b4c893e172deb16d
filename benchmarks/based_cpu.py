"""BASED forward + backward on the CPU: our XLA path against flash-linear-attention's `naive_chunk_based`.

The comparison: fla's naive chunked PyTorch path (fla/ops/based/naive.py, the fastest CPU path among the
published BASED implementations) against `based_linear_attention(implementation="xla")`, forward + backward, float32,
B = 1, H = 2, feature dim F = 16 (fla's q/k head dim), value dim V = 64, T in {1k, 4k}; target: ours >= 2x faster at
both lengths on a quiet machine (an earlier 3x target was only ever met under load, where torch's threads suffer
most; benchmarks/README.md).

Timed functions. Ours: the jitted value_and_grad (w.r.t. q, k, v) of sum(out * cotangent), inputs [B, T, H, *].
fla's: `naive_chunk_based(q, k, v, chunk_size)` on [B, H, T, *] tensors that require grad, then
`(out * cotangent).sum().backward()`, in a separate Python (`--fla-python`, a venv with torch and einops; fla's
package __init__ imports its Triton kernels, so the worker loads fla/ops/based/naive.py by file path and needs
neither triton nor a GPU). Both get the same numpy inputs (fla's transposed to head-major), and the report gives
each one's relative error against our quadratic oracle (`implementation="reference"`), so a layout or scaling
mismatch shows up as an error, not as a speed.

fla runs in one worker per torch thread count in `--fla-threads` (default 1 and 2) and allocator setting in
`--fla-malloc` (glibc's default, and the host_malloc settings this process runs with, train/host_malloc.py): on a
shared machine torch's 2-thread OpenMP loops slow down many-fold when other jobs hold the cores, so the ratio is taken
against whichever worker is faster at each T. The paths are interleaved (ours, fla 1 thread, fla 2 threads, ours,
...) for `--reps` rounds after `--warmup` rounds, so a load spike from other jobs hits all of them alike; in a round
each path runs `--burst` calls in a row and only the last is timed (its threads and caches warm again after the other
paths ran, as in back-to-back training steps). The report holds every time, medians, minima, the load average before
and after, and fastest fla / ours per T.

Run:   .venv/bin/python benchmarks/based_cpu.py --fla-python /work/venv311/bin/python [--lengths 1024 4096] [--out FILE]
"""

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, PipeWorker, emit, interleave, loss_and_grads, peer_allocators

from effarch.pallas_kernels.based import based_linear_attention

DEFAULT_LENGTHS = (1024, 4096)
TARGET_SPEEDUP = 2.0
ERR_KEYS = ("loss", "dq", "dk", "dv")

# The fla side: a line-oriented worker. It reads one JSON command per line from stdin and answers one JSON line.
#   {"load": npz path, "out": npz path, "chunk_size": c} -> runs once, saves its output and gradients to "out"
#   {"time": npz path, "chunk_size": c}                   -> {"seconds": wall time of one forward + backward}
_FLA_WORKER = r"""
import importlib.util, json, sys, time
import numpy as np, torch

spec = importlib.util.find_spec("fla")
if spec is None:
    raise SystemExit("fla-core is not installed in " + sys.executable)
naive_path = spec.submodule_search_locations[0] + "/ops/based/naive.py"
naive_spec = importlib.util.spec_from_file_location("fla_based_naive", naive_path)
naive = importlib.util.module_from_spec(naive_spec)
naive_spec.loader.exec_module(naive)
torch.set_num_threads(int(sys.argv[1]))
from importlib.metadata import version
print(json.dumps({"torch": torch.__version__, "fla": version("fla-core"), "threads": torch.get_num_threads(),
                  "naive_path": naive_path}), flush=True)
cache = {}

def inputs(path):
    if path not in cache:
        a = np.load(path)
        # [B, T, H, *] -> fla's head-major [B, H, T, *]
        qkv = [torch.from_numpy(np.ascontiguousarray(a[n].transpose(0, 2, 1, 3))) for n in ("q", "k", "v", "do")]
        for t in qkv[:3]:
            t.requires_grad_(True)
        cache[path] = qkv
    return cache[path]

def step(path, chunk_size):
    q, k, v, do = inputs(path)
    for t in (q, k, v):
        t.grad = None
    out = naive.naive_chunk_based(q, k, v, chunk_size=chunk_size)
    (out * do).sum().backward()
    return out

for line in sys.stdin:
    cmd = json.loads(line)
    if "load" in cmd:
        out = step(cmd["load"], cmd["chunk_size"])
        q, k, v, _ = inputs(cmd["load"])
        arrays = [out.detach(), q.grad, k.grad, v.grad]
        np.savez(cmd["out"], **{n: a.numpy().transpose(0, 2, 1, 3) for n, a in zip(("o", "dq", "dk", "dv"), arrays)})
        print(json.dumps({"saved": cmd["out"]}), flush=True)
    else:
        start = time.perf_counter()
        step(cmd["time"], cmd["chunk_size"])
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def make_inputs(t: int, batch: int, heads: int, feature_dim: int, value_dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    qk = (batch, t, heads, feature_dim)
    vo = (batch, t, heads, value_dim)
    return {n: rng.standard_normal(s, np.float32) for n, s in (("q", qk), ("k", qk), ("v", vo), ("do", vo))}


def run(
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    *,
    batch: int = 1,
    heads: int = 2,
    feature_dim: int = 16,
    value_dim: int = 64,
    chunk_size: int | None = None,
    reps: int = 20,
    warmup: int = 3,
    fla_python: str | None = None,
    fla_threads: Sequence[int] = (1, 2),
    fla_chunk_size: int = 256,
    fla_malloc: str = "both",
    burst: int = 1,
) -> dict:
    """Times both paths at each T, interleaved; see the module docstring. chunk_size None: the op's default."""
    if fla_python and any(t % fla_chunk_size for t in lengths):
        bad = [t for t in lengths if t % fla_chunk_size]
        raise ValueError(f"naive_chunk_based needs T divisible by --fla-chunk-size={fla_chunk_size}, got T in {bad}")
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    ours = jax.jit(loss_and_grads(lambda q, k, v: based_linear_attention(q, k, v, implementation="xla", **kwargs)))
    oracle = jax.jit(loss_and_grads(lambda q, k, v: based_linear_attention(q, k, v, implementation="reference")))
    fla = ({f"fla_naive_chunk_{n}t{suffix}": PipeWorker(fla_python, _FLA_WORKER, n, name="fla worker", env=env)
            for n in fla_threads for suffix, env in peer_allocators(fla_malloc).items()} if fla_python else {})
    results = {}
    load_at_start = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for t in lengths:
                arrays = make_inputs(t, batch, heads, feature_dim, value_dim)
                args = tuple(jnp.asarray(arrays[n]) for n in ("q", "k", "v", "do"))
                path = os.path.join(tmp, f"inputs_{t}.npz")
                np.savez(path, **arrays)

                # Correctness first: the loss <o, do> and the three gradients against the quadratic oracle.
                loss, grads = ours(*args)
                loss_ref, grads_ref = oracle(*args)
                errs = [rel_err(loss, loss_ref)] + [rel_err(g, r) for g, r in zip(grads, grads_ref)]
                record = {"xla": {"rel_err_vs_reference": dict(zip(ERR_KEYS, errs))}}
                for name, worker in fla.items():
                    out_path = os.path.join(tmp, f"{name}_{t}.npz")
                    worker.ask(load=path, out=out_path, chunk_size=fla_chunk_size)
                    got = np.load(out_path)
                    loss_fla = float((got["o"].astype(np.float64) * arrays["do"]).sum())
                    errs = [rel_err(loss_fla, loss_ref)] + [rel_err(got[n], r) for n, r in zip(ERR_KEYS[1:], grads_ref)]
                    record[name] = {"rel_err_vs_reference": dict(zip(ERR_KEYS, errs))}

                calls = {"xla": lambda: jax.block_until_ready(ours(*args))}
                for name, worker in fla.items():
                    calls[name] = lambda worker=worker: worker.ask(time=path, chunk_size=fla_chunk_size)
                times = interleave(calls, reps=reps, warmup=warmup, burst=burst)
                for name, ts in times.items():
                    record[name].update(median_s=statistics.median(ts), min_s=min(ts), times_s=ts)
                if fla:
                    best = min(fla, key=lambda name: record[name]["median_s"])
                    record["fastest_fla"] = best
                    record["fla_over_xla"] = record[best]["median_s"] / record["xla"]["median_s"]
                results[str(t)] = record
    finally:
        for worker in fla.values():
            worker.close()
    config = {
        "burst": burst,
        "lengths": list(lengths),
        "batch": batch,
        "heads": heads,
        "feature_dim": feature_dim,
        "value_dim": value_dim,
        "chunk_size": chunk_size,
        "reps": reps,
        "warmup": warmup,
        "jax": jax.__version__,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    report = {"config": config, "results": results}
    if fla:
        config["fla"] = {"chunk_size": fla_chunk_size, **{name: w.info for name, w in fla.items()}}
        speedups = {t: r["fla_over_xla"] for t, r in results.items()}
        report["targets"] = {
            "xla_vs_fla_naive_chunk": {
                "min_speedup": TARGET_SPEEDUP,
                "speedups": speedups,
                "pass": min(speedups.values()) >= TARGET_SPEEDUP,
            }
        }
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--feature-dim", type=int, default=16, help="F: q/k head dim fed to the Taylor map")
    p.add_argument("--value-dim", type=int, default=64, help="V")
    p.add_argument("--chunk-size", type=int, default=None, help="our chunk C (default: the op's own choice)")
    p.add_argument("--reps", type=int, default=20, help="timed calls of each path per T, interleaved")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fla-python", help="a Python with torch, einops and fla-core; without it only ours runs")
    p.add_argument(
        "--fla-threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch thread counts for fla, one worker each; the ratio uses the fastest",
    )
    p.add_argument("--fla-chunk-size", type=int, default=256, help="naive_chunk_based's chunk_size (its default)")
    p.add_argument("--fla-malloc", choices=("both", "default", "host"), default="both",
                   help="fla workers with glibc's default allocator, with this process's host_malloc settings, or "
                        "one of each (the ratio uses the fastest worker)")
    p.add_argument("--burst", type=int, default=2,
                   help="calls of one path in a row per round, only the last timed (_common.interleave)")
    p.add_argument("--out", help="also write the JSON report here")
    a = p.parse_args(argv)
    gate = LoadGate()
    report = run(
        a.lengths,
        batch=a.batch,
        heads=a.heads,
        feature_dim=a.feature_dim,
        value_dim=a.value_dim,
        chunk_size=a.chunk_size,
        reps=a.reps,
        warmup=a.warmup,
        fla_python=a.fla_python,
        fla_threads=a.fla_threads,
        fla_chunk_size=a.fla_chunk_size,
        fla_malloc=a.fla_malloc,
        burst=a.burst,
    )
    return emit(gate.stamp(report), a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
