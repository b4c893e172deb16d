"""Throughput and memory of Lightning attention vs softmax attention as the sequence grows, at a fixed token budget.

Paper claim under test: Lightning Attention-2 (arXiv 2401.04658) keeps training speed constant in the sequence
length ("Various Lengths, Constant Speed", arXiv 2405.17381), while softmax attention's cost per token grows with T.

Setup: op level, no projections. For each T the batch is `budget // T`, so every step processes the same number of
tokens; the timed function is the jitted value_and_grad (w.r.t. q, k, v) of sum(out · cotangent), float32, H heads
of width K = V. Paths: `lightning_attention(implementation="xla")` (block tiling + custom_vjp two-pass backward)
and `dot_product_attention(causal=True, implementation="xla")`. Time is the median of `--reps` calls after a
warmup; memory is XLA's compiled memory analysis (CPU has no device memory statistics), so it is what the
compiled program reserves, not a measured resident size.

A softmax length whose compiled temporary buffers exceed `--softmax-max-gib` is compiled (for its memory numbers)
but not run, and is listed under "skipped".

Run:   .venv/bin/python benchmarks/lightning_scaling.py [--quick] [--lengths 1024 2048] [--out FILE]
"""

import argparse
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from _common import LoadGate, by_str, compile_and_time, emit, loss_and_grads, platform_info, skipped, sweep

from effarch.pallas_kernels.attention import dot_product_attention
from effarch.pallas_kernels.lightning import lightning_attention, tnl_decay

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 4096)
PATHS = ("lightning_xla", "softmax_xla")
# Targets (our acceptance numbers): flat Lightning throughput and memory, falling softmax throughput.
LIGHTNING_SPEED_TOLERANCE = 0.20
LIGHTNING_MEMORY_TOLERANCE = 0.10


def _attention_fn(path: str, heads: int, block_size: int) -> Callable:
    """The op under test, (q, k, v) [B, T, H, K] -> [B, T, H, V]."""
    if path == "lightning_xla":
        # The first layer of a 2-layer TNL stack: the fastest decay, as in a real model.
        decay = tnl_decay(heads, 0, 2)
        return lambda q, k, v: lightning_attention(q, k, v, decay, block_size=block_size, implementation="xla")
    if path == "softmax_xla":
        return lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="xla")
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def _inputs(batch: int, t_len: int, heads: int, head_dim: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, t_len, heads, head_dim)
    # Lightning feeds SiLU(x W) into the op; small positive-ish inputs keep both paths finite at 16k tokens.
    q, k, v, ct = (jax.random.normal(key, shape, jnp.float32) * 0.1 for key in keys)
    return q, k, v, ct


def measure(
    path: str,
    t_len: int,
    *,
    budget: int,
    heads: int,
    head_dim: int,
    block_size: int,
    warmup: int,
    reps: int,
    max_temp_bytes: int | None,
    seed: int = 0,
) -> dict:
    """Compiles and times one (path, T). Returns the per-T record; "skipped" is set instead of timings if the
    compiled temporaries exceed max_temp_bytes."""
    batch = max(budget // t_len, 1)
    args = _inputs(batch, t_len, heads, head_dim, seed)
    record = {"batch": batch, "tokens": batch * t_len, **compile_and_time(
        loss_and_grads(_attention_fn(path, heads, block_size)), args, warmup=warmup, reps=reps,
        max_temp_bytes=max_temp_bytes)}
    if "median_s" in record:
        record["tokens_per_s"] = batch * t_len / record["median_s"]
    return record


def _targets(results: dict[str, dict[int, dict]]) -> dict:
    """Checks the acceptance targets on the measured lengths (first = shortest, last = longest measured)."""
    targets = {}
    light = {t: r for t, r in results.get("lightning_xla", {}).items() if "tokens_per_s" in r}
    if len(light) >= 2:
        t0, t1 = min(light), max(light)
        speed = light[t1]["tokens_per_s"] / light[t0]["tokens_per_s"]
        targets["lightning_tokens_per_s_flat"] = {
            "lengths": [t0, t1],
            "ratio": speed,
            "tolerance": LIGHTNING_SPEED_TOLERANCE,
            "pass": speed >= 1 - LIGHTNING_SPEED_TOLERANCE,
        }
    light_mem = {t: r["memory"]["peak_bytes"] for t, r in results.get("lightning_xla", {}).items()}
    if len(light_mem) >= 2:
        spread = max(light_mem.values()) / min(light_mem.values()) - 1
        targets["lightning_peak_memory_flat"] = {
            "lengths": sorted(light_mem),
            "max_over_min_minus_1": spread,
            "tolerance": LIGHTNING_MEMORY_TOLERANCE,
            "pass": spread <= LIGHTNING_MEMORY_TOLERANCE,
            "load_free": True,  # compiled memory: the load cannot change it
        }
    soft = {t: r["tokens_per_s"] for t, r in results.get("softmax_xla", {}).items() if "tokens_per_s" in r}
    if len(soft) >= 2:
        ordered = [soft[t] for t in sorted(soft)]
        targets["softmax_tokens_per_s_falls"] = {
            "lengths": sorted(soft),
            "ratio_longest_to_shortest": ordered[-1] / ordered[0],
            "pass": all(b < a for a, b in zip(ordered, ordered[1:])),
        }
    return targets


def run(
    lengths: Sequence[int],
    *,
    paths: Sequence[str] = PATHS,
    budget: int = 16384,
    heads: int = 4,
    head_dim: int = 64,
    block_size: int = 64,
    warmup: int = 1,
    reps: int = 5,
    softmax_max_gib: float | None = 10.0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Runs the sweep and returns the JSON-ready report (see the module docstring)."""
    lengths = sorted(set(lengths))
    max_temp = None if softmax_max_gib is None else int(softmax_max_gib * 2**30)
    def line(path, t_len, record):
        speed = f"{record['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in record else record["skipped"]
        return (f"{path:14s} T={t_len:6d} B={record['batch']:4d} {speed}, "
                f"peak {record['memory']['peak_bytes'] / 2**20:,.1f} MiB")

    results = sweep(paths, lengths, lambda path, t_len: measure(
        path, t_len, budget=budget, heads=heads, head_dim=head_dim, block_size=block_size, warmup=warmup, reps=reps,
        max_temp_bytes=max_temp if path == "softmax_xla" else None,
    ), log=log, line=line)
    ratios = {}
    for path, per_t in results.items():
        timed = {t: r["tokens_per_s"] for t, r in per_t.items() if "tokens_per_s" in r}
        if timed:
            base = timed[min(timed)]
            ratios[path] = {str(t): s / base for t, s in sorted(timed.items())}
    return {
        "config": {
            "lengths": lengths,
            "budget_tokens": budget,
            "heads": heads,
            "head_dim": head_dim,
            "lightning_block_size": block_size,
            "dtype": "float32",
            "warmup": warmup,
            "reps": reps,
            "softmax_max_temp_gib": softmax_max_gib,
            **platform_info(),
        },
        "results": by_str(results),
        "ratios": ratios,
        "skipped": skipped(results),
        "targets": _targets(results),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {list(DEFAULT_LENGTHS)})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: lengths {list(QUICK_LENGTHS)}, 2 reps")
    p.add_argument("--budget", type=int, default=16384, help="tokens per batch; batch = budget // T")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64, help="Lightning block size C")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--softmax-max-gib", type=float, default=10.0,
                   help="skip softmax lengths whose compiled temporaries exceed this; <= 0 disables the cap")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    gate = LoadGate()
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    report = run(
        lengths,
        paths=args.paths,
        budget=args.budget,
        heads=args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        warmup=args.warmup,
        reps=reps,
        softmax_max_gib=args.softmax_max_gib if args.softmax_max_gib > 0 else None,
        log=lambda line: print(line, file=sys.stderr),
    )
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
