"""Block-sparse attention (the gathered-block XLA path) vs dense causal XLA attention on the CPU, forward + backward.

Claim under test: with ~10% of the key blocks listed, `block_sparse_attention(implementation="xla")` is at least 5x
faster than dense causal softmax attention at T = 8k and 32k, with memory O(T · Kmax · kv_block), never [T, T].

Setup: op level, float32, B = 1, H = 4 heads (one list per head, Hs = H = Hkv), D = 64, q_block = kv_block = 64. The
lists are random and causal: query block I lists its diagonal block plus Kmax - 1 distinct earlier blocks (all of
them while I < Kmax), Kmax = round(density · nKb); the report gives the fraction of all blocks and of the causal
blocks listed. The timed function is the jitted value_and_grad (w.r.t. q, k, v) of sum(out · cotangent) for
- `block_sparse_xla`: `block_sparse_attention(implementation="xla")`, the lists passed as traced arguments;
- `dense_xla`: `effarch.pallas_kernels.attention.dot_product_attention(causal=True, implementation="xla")`, one
  [T, T] score matrix per head (80 GiB of temporaries at 32k: compiled, not run, on a 24 GiB host);
- `dense_xla_chunked`: the same exact dense causal attention by query chunks of `--dense-chunk` rows, chunk c reading
  its causal prefix of keys through `jax.nn.dot_product_attention` under `jax.checkpoint` (the backward recomputes
  one chunk's scores at a time; an optimization barrier keeps the chunks in order): the dense baseline that fits in
  memory at 32k, and skips the upper triangle's chunks as a flash kernel does.
All are compiled first (compile time, XLA's compiled memory analysis: temporaries, peak = arguments + outputs +
temporaries - aliased), then called alternately, `--warmup` rounds untimed and `--reps` timed rounds, so a load
spike from other jobs hits all; the median of each is reported with every time. A dense length whose compiled
temporaries exceed `--dense-max-gib` is compiled for its memory numbers but not run (listed under "skipped"). The
speedup is taken against each dense path that ran; the verdict uses the faster one (the stronger baseline).

The machine may be shared. `_common.OtherLoad` measures the CPU that other processes used during the run (the load
average cannot: this benchmark's own two threads hold it near 2); above a quarter of a core the result is marked
"loaded" and no target verdict is given. The load averages are recorded too.

Result (benchmarks/results/block_sparse_cpu.{json,png}; jax 0.12.1, 2-core CPU, quiet: other processes used 0.007
cores; lists 9.7% / 9.5% of all blocks): PASS.
    T       block_sparse_xla     dense_xla              dense_xla_chunked     speedup (vs the faster dense)
    8192    0.337 s,  65 MiB     4.302 s, 5,136 MiB     3.179 s, 1,120 MiB    9.4x time, 17x-79x memory
    32768   4.424 s, 209 MiB     not run, 81,984 MiB    43.74 s, 5,248 MiB    9.9x time, 25x-391x memory
Run:   .venv/bin/python benchmarks/block_sparse_cpu.py [--quick] [--lengths 8192 32768] [--out FILE.json] [--png FILE]
       (with --out and no --png, the PNG is written beside the JSON, same name, .png)
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, OtherLoad, emit, loss_and_grads, memory_stats, platform_info

from effarch.pallas_kernels.attention import dot_product_attention
from effarch.pallas_kernels.block_sparse import block_sparse_attention, random_causal_lists

DEFAULT_LENGTHS = (8192, 32768)
QUICK_LENGTHS = (2048, 4096)
PATHS = ("block_sparse_xla", "dense_xla", "dense_xla_chunked")
DENSE_PATHS = PATHS[1:]
TARGET_SPEEDUP = 5.0


def _compile(fn, args, max_temp_bytes: int | None) -> tuple[object, dict]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    record = {"compile_s": time.perf_counter() - start, "memory": memory_stats(compiled)}
    if max_temp_bytes is not None and record["memory"]["temp_bytes"] > max_temp_bytes:
        record["skipped"] = (f"compiled temporaries {record['memory']['temp_bytes'] / 2**30:.2f} GiB exceed the cap "
                             f"{max_temp_bytes / 2**30:.2f} GiB; not run")
        return None, record
    return compiled, record


def dense_chunked(q, k, v, *, chunk: int):
    """Exact causal softmax attention q, k, v [B, T, H, D] -> [B, T, H, D], by query chunks of `chunk` rows: chunk c
    attends to keys [0, (c + 1) · chunk) with the causal mask, under jax.checkpoint so the backward holds one chunk's
    scores at a time. T must be a multiple of chunk."""
    T = q.shape[1]
    outs = []
    for start in range(0, T, chunk):
        end = start + chunk
        mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]  # [chunk, end]

        @jax.checkpoint
        def one(q_c, k_c, v_c, mask=mask):
            return jax.nn.dot_product_attention(q_c, k_c, v_c, mask=mask[None, None], implementation="xla")

        o = one(q[:, start:end], k[:, :end], v[:, :end])
        # Chunk c + 1 reads the k, v that leave this barrier with chunk c's output, so XLA runs (and, transposed,
        # differentiates) the chunks in order and reuses one chunk's buffers: 5 GiB of temporaries at 32k, not 20.
        o, q, k, v = jax.lax.optimization_barrier((o, q, k, v))
        outs.append(o)
    return jnp.concatenate(outs, axis=1)


def measure(t_len: int, *, batch: int, heads: int, head_dim: int, block: int, density: float, warmup: int, reps: int,
            dense_max_bytes: int | None, dense_chunk: int = 2048, seed: int = 0) -> dict:
    """Both paths at one T: {path: record}, plus the lists' statistics."""
    if t_len % block:
        raise ValueError(f"T={t_len} must be a multiple of --block {block}")
    n = t_len // block
    kmax = max(1, round(density * n))
    rng = np.random.default_rng(seed)
    idx, cnt = random_causal_lists(batch, heads, n, kmax, rng=rng)
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, ct = (jax.random.normal(key, (batch, t_len, heads, head_dim), jnp.float32) for key in keys)
    idx, cnt = jnp.asarray(idx), jnp.asarray(cnt)

    def sparse(q, k, v, ct, idx, cnt):
        attn = lambda q, k, v: block_sparse_attention(q, k, v, idx, cnt, q_block=block, kv_block=block,  # noqa: E731
                                                      implementation="xla")
        return loss_and_grads(attn)(q, k, v, ct)

    def dense(q, k, v, ct, idx, cnt):
        return loss_and_grads(lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="xla"))(
            q, k, v, ct)

    def chunked(q, k, v, ct, idx, cnt):
        return loss_and_grads(lambda q, k, v: dense_chunked(q, k, v, chunk=min(dense_chunk, t_len)))(q, k, v, ct)

    args = (q, k, v, ct, idx, cnt)
    compiled, records = {}, {}
    for path, fn, cap in (("block_sparse_xla", sparse, None), ("dense_xla", dense, dense_max_bytes),
                          ("dense_xla_chunked", chunked, dense_max_bytes)):
        compiled[path], records[path] = _compile(fn, args, cap)
    runnable = {p: c for p, c in compiled.items() if c is not None}
    times = {p: [] for p in runnable}
    for round_ in range(warmup + reps):
        for path, c in runnable.items():
            start = time.perf_counter()
            jax.block_until_ready(c(*args))
            if round_ >= warmup:
                times[path].append(time.perf_counter() - start)
    for path, ts in times.items():
        records[path].update(median_s=statistics.median(ts), times_s=ts)
    listed = int(np.asarray(cnt).sum())
    lists = {"kmax": kmax, "n_blocks": n, "listed_fraction_of_all_blocks": listed / (batch * heads * n * n),
             "listed_fraction_of_causal_blocks": listed / (batch * heads * n * (n + 1) / 2)}
    return {"lists": lists, **records}


def _speedups(results: dict) -> dict:
    """Per length: {dense path: {"time": dense / sparse median (None if not run), "temp_bytes": ratio}} and "time":
    the ratio against the fastest dense path that ran (None if none did)."""
    out = {}
    for t, r in results.items():
        sparse = r["block_sparse_xla"]
        row = {}
        for path in DENSE_PATHS:
            ran = "median_s" in r[path] and "median_s" in sparse
            row[path] = {"time": r[path]["median_s"] / sparse["median_s"] if ran else None,
                         "temp_bytes": r[path]["memory"]["temp_bytes"] / sparse["memory"]["temp_bytes"]}
        timed = [row[p]["time"] for p in DENSE_PATHS if row[p]["time"] is not None]
        row["time"] = min(timed) if timed else None
        out[t] = row
    return out


def plot(report: dict, path: str) -> None:
    """Median fwd + bwd time against T for both paths (log-log); dense lengths not run are marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = [int(t) for t in report["results"]]
    for name, marker in zip(PATHS, "os^"):
        ts = [(t, report["results"][str(t)][name].get("median_s")) for t in lengths]
        ran = [(t, s) for t, s in ts if s is not None]
        if ran:
            ax.plot(*zip(*ran), marker + "-", label=name)
        not_run = [t for t, s in ts if s is None]
        if not_run:
            ax.plot(not_run, [ax.get_ylim()[1]] * len(not_run), "x", color="gray", label=f"{name}: not run (memory)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("forward + backward, median s")
    cfg = report["config"]
    status = "LOADED machine: " if report["loaded"] else ""
    ax.set_title(f"{status}block-sparse ({cfg['density']:.0%} of blocks) vs dense, CPU f32, H={cfg['heads']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(lengths: Sequence[int], *, batch: int = 1, heads: int = 4, head_dim: int = 64, block: int = 64,
        density: float = 0.1, warmup: int = 1, reps: int = 3, dense_max_gib: float | None = 8.0,
        dense_chunk: int = 2048, log=None) -> dict:
    """The JSON-ready report (module docstring)."""
    lengths = sorted(set(lengths))
    load_before = os.getloadavg()
    results = {}
    with OtherLoad() as others:
        for t_len in lengths:
            results[str(t_len)] = _measure_and_log(t_len, log, batch=batch, heads=heads, head_dim=head_dim,
                                                   block=block, density=density, warmup=warmup, reps=reps,
                                                   dense_chunk=dense_chunk, dense_max_bytes=None if dense_max_gib
                                                   is None else int(dense_max_gib * 2**30))
    load_after = os.getloadavg()
    loaded = not others.quiet  # None (no /proc/stat) counts as loaded: quietness unknown
    speedups = _speedups(results)
    timed = {t: s["time"] for t, s in speedups.items() if s["time"] is not None}
    if loaded:
        verdict = (f"loaded (other processes used {others.cores:.2f} cores, >= {OtherLoad.QUIET_BELOW}): no target "
                   f"verdict" if others.cores is not None else "quietness unknown (no /proc/stat): no target verdict")
    elif set(timed) != set(results):
        verdict = f"fail: no dense path ran at T = {sorted(set(results) - set(timed), key=int)}"
    else:
        verdict = "pass" if all(s >= TARGET_SPEEDUP for s in timed.values()) else "fail"
    return {
        "config": {"lengths": lengths, "batch": batch, "heads": heads, "head_dim": head_dim, "q_block": block,
                   "kv_block": block, "density": density, "dtype": "float32", "warmup": warmup, "reps": reps,
                   "dense_max_temp_gib": dense_max_gib, "dense_chunk": dense_chunk, "cpu_count": os.cpu_count(),
                   **platform_info()},
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "other_processes_cores": others.cores,
        "loaded": loaded,
        "results": results,
        "speedup": speedups,
        "skipped": {t: {p: r[p]["skipped"] for p in DENSE_PATHS if "skipped" in r[p]}
                    for t, r in results.items() if any("skipped" in r[p] for p in DENSE_PATHS)},
        "target": {"min_time_speedup": TARGET_SPEEDUP, "verdict": verdict},
    }


def _measure_and_log(t_len: int, log, **kw) -> dict:
    r = measure(t_len, **kw)
    if log is not None:
        line = [f"T={t_len:6d}"]
        for path in PATHS:
            speed = f"{r[path]['median_s']:.3f} s" if "median_s" in r[path] else "not run"
            line.append(f"{path} {speed} (temp {r[path]['memory']['temp_bytes'] / 2**20:,.0f} MiB)")
        log(", ".join(line) + f", load {os.getloadavg()[0]:.2f}")
    return r


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {list(DEFAULT_LENGTHS)})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: lengths {list(QUICK_LENGTHS)}, 2 reps")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64, help="q_block = kv_block")
    p.add_argument("--density", type=float, default=0.1, help="Kmax = round(density * number of key blocks)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dense-max-gib", type=float, default=8.0,
                   help="compile but do not run dense lengths whose temporaries exceed this; <= 0 disables the cap")
    p.add_argument("--dense-chunk", type=int, default=2048, help="query rows per chunk of dense_xla_chunked")
    p.add_argument("--out", help="also write the JSON report here (and the PNG beside it unless --png)")
    p.add_argument("--png", help="write the time-vs-T plot here (needs matplotlib, the plots extra)")
    args = p.parse_args(argv)
    gate = LoadGate()
    if not 0 < args.density <= 1:
        p.error(f"--density must lie in (0, 1], got {args.density}")
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    bad = [t for t in lengths if t <= 0 or t % args.block or t % min(args.dense_chunk, t)]
    if bad:
        p.error(f"--lengths {bad} must be positive multiples of --block {args.block} and of --dense-chunk "
                f"{args.dense_chunk} (or shorter than it)")
    report = run(lengths, batch=args.batch, heads=args.heads, head_dim=args.head_dim, block=args.block,
                 density=args.density, warmup=args.warmup, reps=args.reps if args.reps is not None else
                 (2 if args.quick else 3), dense_max_gib=args.dense_max_gib if args.dense_max_gib > 0 else None,
                 dense_chunk=args.dense_chunk,
                 log=lambda line: print(line, file=sys.stderr))
    png = args.png or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if png:
        plot(report, png)
        report["png"] = png
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
