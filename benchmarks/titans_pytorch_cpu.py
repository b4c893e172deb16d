"""The Titans NeuralMemory layer, forward + backward on the CPU: ours against lucidrains' titans-pytorch.

A side-by-side: titans-pytorch's `NeuralMemory` (the best-known behavioural reference; its C16 layer takes
~0.54 s at 1k and ~4.3 s at 4k on a quiet 2-core machine) against our `layers/titans.py::NeuralMemory` (parallel
`xla` op) at the same sizes: d_model 256, 4 heads of 64, a 2-layer MLP memory of expansion 4 (titans-pytorch's
default `MemoryMLP(depth=2, expansion_factor=4)`; ours is gelu(x w1) w2 with the same shapes), chunk C, the same
gradient-point mini-batch (`--batch-size`: titans-pytorch's `batch_size`, ours `titans.batch_size`; 0 = None: every
gradient at the initial weights, titans-pytorch's default), batch 1, float32. Target: ours >= 2x faster at every T
on a quiet machine (an earlier 3x was only ever met under load; benchmarks/README.md) and linear in T (time per
token at the longest T within 1.5x of the shortest).

Timed functions. Ours: the jitted value_and_grad w.r.t. the layer's parameters and input of sum(layer(x) * ct).
titans-pytorch's: `retrieved, _ = mem(x)` then `(retrieved * ct).sum().backward()` with x requiring grad, in a
separate Python (`--torch-python`, a venv with torch and titans-pytorch), one worker per torch thread count in
`--torch-threads` and allocator setting in `--torch-malloc` (glibc's default, and the host_malloc settings this
process runs with, train/host_malloc.py); the ratio uses the fastest (torch's 2-thread loops suffer most when other
jobs hold the cores).
Both get the same numpy x and ct. The layers differ in details outside the memory (titans-pytorch's default has no
output gate or q/k/v convolutions; ours has both), so the outputs are not compared; each output is checked finite.
Calls are interleaved (ours, torch 1 thread, torch 2 threads, ours, ...) for `--reps` rounds after `--warmup`, so a
load spike hits every path alike; in a round each path runs `--burst` calls in a row and only the last is timed (its
threads and caches warm again after the other paths ran, as in back-to-back training steps). The report gives
medians, minima and the load average before and after.

Run:   .venv/bin/python benchmarks/titans_pytorch_cpu.py --torch-python /work/venv311/bin/python
           [--lengths 1024 4096] [--chunk 16] [--batch-size 0] [--torch-malloc both] [--burst 2] [--out FILE]
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
from _common import LoadGate, PipeWorker, emit, interleave, peer_allocators
from flax import nnx

from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig

DEFAULT_LENGTHS = (1024, 4096)
TARGET_SPEEDUP = 2.0
PER_TOKEN_TOLERANCE = 1.5

# A line-oriented worker: one JSON command per line on stdin, one JSON answer per line on stdout.
#   {"time": npz path} -> {"seconds": wall time of one forward + backward, "finite": bool}
_TORCH_WORKER = r"""
import json, sys, time
import numpy as np, torch
from importlib.metadata import version
from titans_pytorch import NeuralMemory

threads, dim, heads, chunk, batch_size = (int(a) for a in sys.argv[1:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
mem = NeuralMemory(dim=dim, chunk_size=chunk, heads=heads, dim_head=dim // heads, batch_size=batch_size or None)
print(json.dumps({"torch": torch.__version__, "titans_pytorch": version("titans-pytorch"),
                  "threads": torch.get_num_threads(),
                  "parameters": sum(p.numel() for p in mem.parameters())}), flush=True)
cache = {}
for line in sys.stdin:
    path = json.loads(line)["time"]
    if path not in cache:
        a = np.load(path)
        cache[path] = torch.from_numpy(a["x"]).requires_grad_(True), torch.from_numpy(a["ct"])
    x, ct = cache[path]
    x.grad = None
    mem.zero_grad(set_to_none=True)
    start = time.perf_counter()
    retrieved, _ = mem(x)
    (retrieved * ct).sum().backward()
    seconds = time.perf_counter() - start
    finite = bool(torch.isfinite(retrieved).all() and torch.isfinite(x.grad).all())
    print(json.dumps({"seconds": seconds, "finite": finite}), flush=True)
"""


def ours_fn(d_model: int, heads: int, chunk: int, batch_size: int):
    """The jitted forward + backward of our layer, and its parameters."""
    cfg = NeuralMemoryConfig(n_heads=heads, chunk_size=chunk, batch_size=batch_size or None)
    graphdef, params = nnx.split(NeuralMemory(d_model, cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p, x, ct):
        return jnp.sum(nnx.merge(graphdef, p)(x) * ct)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def run(lengths: Sequence[int] = DEFAULT_LENGTHS, *, d_model: int = 256, heads: int = 4, chunk: int = 16,
        batch_size: int = 0, reps: int = 5, warmup: int = 1, torch_python: str | None = None,
        torch_threads: Sequence[int] = (1, 2), torch_malloc: str = "both", burst: int = 1) -> dict:
    """Times both layers at each T, interleaved; see the module docstring."""
    if batch_size and batch_size % chunk:
        raise ValueError(f"--batch-size={batch_size} must be a multiple of --chunk={chunk}")
    ours, params = ours_fn(d_model, heads, chunk, batch_size)
    workers = ({f"titans_pytorch_{n}t{suffix}": PipeWorker(torch_python, _TORCH_WORKER, n, d_model, heads, chunk,
                                                           batch_size, name="titans-pytorch worker", env=env)
                for n in torch_threads for suffix, env in peer_allocators(torch_malloc).items()}
               if torch_python else {})
    results, load_at_start = {}, os.getloadavg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for t in lengths:
                rng = np.random.default_rng(t)
                x, ct = (rng.standard_normal((1, t, d_model), np.float32) for _ in range(2))
                path = os.path.join(tmp, f"inputs_{t}.npz")
                np.savez(path, x=x, ct=ct)
                args = (params, jnp.asarray(x), jnp.asarray(ct))
                loss, grads = ours(*args)
                finite = bool(np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads)))
                record = {"ours_xla": {"finite": finite}}
                calls = {"ours_xla": lambda: jax.block_until_ready(ours(*args))}
                for name, worker in workers.items():
                    record[name] = {"finite": True}
                    calls[name] = lambda worker=worker: worker.ask(time=path)

                def finite_reply(name, reply):
                    record[name]["finite"] &= reply["finite"]

                times = interleave(calls, reps=reps, warmup=warmup, burst=burst, on_reply=finite_reply)
                for name, ts in times.items():
                    median = statistics.median(ts)
                    record[name].update(median_s=median, min_s=min(ts), times_s=ts, us_per_token=1e6 * median / t)
                if workers:
                    best = min(workers, key=lambda name: record[name]["median_s"])
                    record["fastest_torch"] = best
                    record["torch_over_ours"] = record[best]["median_s"] / record["ours_xla"]["median_s"]
                results[str(t)] = record
                print(f"T={t}: " + ", ".join(f"{n} {record[n]['median_s']:.3f} s" for n in calls), file=sys.stderr)
    finally:
        for worker in workers.values():
            worker.close()
    config = {"burst": burst, "lengths": list(lengths), "d_model": d_model, "heads": heads,
              "head_dim": d_model // heads, "expansion": 4, "chunk": chunk, "batch_size": batch_size or None,
              "reps": reps, "warmup": warmup,
              "jax": jax.__version__, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    report = {"config": config, "results": results}
    t0, t1 = str(min(lengths)), str(max(lengths))
    targets = {}
    if t1 != t0:
        ratio = results[t1]["ours_xla"]["us_per_token"] / results[t0]["ours_xla"]["us_per_token"]
        targets["ours_linear_in_T"] = {"per_token_ratio": ratio, "tolerance": PER_TOKEN_TOLERANCE,
                                       "pass": ratio <= PER_TOKEN_TOLERANCE}
    if workers:
        config["titans_pytorch"] = {name: w.info for name, w in workers.items()}
        speedups = {t: r["torch_over_ours"] for t, r in results.items()}
        targets["ours_vs_titans_pytorch"] = {"min_speedup": TARGET_SPEEDUP, "speedups": speedups,
                                             "pass": min(speedups.values()) >= TARGET_SPEEDUP}
    report["targets"] = targets
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths T")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunk", type=int, default=16, help="memory chunk size C")
    p.add_argument("--batch-size", type=int, default=0,
                   help="tokens between gradient-point refreshes, a multiple of C; 0: None (titans-pytorch's default)")
    p.add_argument("--reps", type=int, default=5, help="timed calls of each path per T, interleaved")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch-python", help="a Python with torch and titans-pytorch; without it only ours runs")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts, one worker each; the ratio uses the fastest")
    p.add_argument("--torch-malloc", choices=("both", "default", "host"), default="both",
                   help="torch workers with glibc's default allocator, with this process's host_malloc settings, or "
                        "one of each (the ratio uses the fastest worker)")
    p.add_argument("--burst", type=int, default=2,
                   help="calls of one path in a row per round, only the last timed (_common.interleave)")
    p.add_argument("--out", help="also write the JSON report here")
    a = p.parse_args(argv)
    gate = LoadGate()
    report = run(a.lengths, d_model=a.d_model, heads=a.heads, chunk=a.chunk, batch_size=a.batch_size, reps=a.reps,
                 warmup=a.warmup, torch_python=a.torch_python, torch_threads=a.torch_threads,
                 torch_malloc=a.torch_malloc, burst=a.burst)
    return emit(gate.stamp(report), a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
