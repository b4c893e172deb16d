"""Speed and memory of the Titans NeuralMemory layer (forward + backward) against sequence length and chunk size.

Issue targets under test (float32, CPU): at d_model 256 with 4 heads of 64,
- the time per token at the longest length (16k) stays within 1.5x of the shortest (1k), per chunk size;
- the parallel `xla` op is >= 5x faster than the `reference` token loop at 1k;
- the longest length fits in 8 GB (XLA's compiled peak: arguments + outputs + temporaries).

Setup: one NeuralMemory layer (layers/titans.py; expansion 4, mini-batch `--batch-size` tokens, no persistent
tokens), batch 1; the timed function is the jitted value_and_grad w.r.t. the layer's parameters and the input of
sum(layer(x) · cotangent). Time is the median of `--reps` calls after a warmup; memory is XLA's compiled memory
analysis (CPU has no device memory statistics), so it is what the compiled program reserves, not a measured RSS.
The reference path runs only at the lengths in `--reference-lengths`.

Run:   .venv/bin/python benchmarks/titans_speed.py [--quick] [--lengths 1024 4096] [--chunks 16 64] [--out FILE]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from _common import LoadGate, emit, memory_stats, time_calls
from flax import nnx

from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig

DEFAULT_LENGTHS = (1024, 4096, 16384)
QUICK_LENGTHS = (256, 1024)
PER_TOKEN_TOLERANCE = 1.5  # time per token at the longest length / at the shortest
XLA_OVER_REFERENCE = 5.0  # xla speed-up over the token loop at the reference lengths
MEMORY_CAP_BYTES = 8 * 10**9


def measure(d_model: int, heads: int, chunk: int, batch_size: int | None, t_len: int, implementation: str, *,
            warmup: int, reps: int, seed: int = 0) -> dict:
    """Compiles and times forward + backward of one layer at one (chunk, T, implementation)."""
    cfg = NeuralMemoryConfig(n_heads=heads, chunk_size=chunk, batch_size=batch_size, implementation=implementation)
    graphdef, params = nnx.split(NeuralMemory(d_model, cfg, rngs=nnx.Rngs(seed)), nnx.Param)

    def loss(p, x, ct):
        return jnp.sum(nnx.merge(graphdef, p)(x) * ct)

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (1, t_len, d_model), jnp.float32)
    ct = jax.random.normal(kc, (1, t_len, d_model), jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, x, ct).compile()
    record = {"compile_s": time.perf_counter() - start, "memory": memory_stats(compiled)}
    times = time_calls(compiled, (params, x, ct), warmup, reps)
    median = statistics.median(times)
    record.update(median_s=median, times_s=times, tokens_per_s=t_len / median, us_per_token=1e6 * median / t_len)
    return record


def _targets(results: dict[str, dict[str, dict]], chunks: Sequence[int], lengths: Sequence[int],
             reference_lengths: Sequence[int]) -> dict:
    """Each acceptance target recomputed from the measured records."""
    targets = {}
    t0, t1 = min(lengths), max(lengths)
    if t1 > t0:
        for c in chunks:
            per_t = results[f"xla_c{c}"]
            ratio = per_t[str(t1)]["us_per_token"] / per_t[str(t0)]["us_per_token"]
            targets[f"xla_c{c}_per_token_time_{t1}_over_{t0}"] = {
                "ratio": ratio, "tolerance": PER_TOKEN_TOLERANCE, "pass": ratio <= PER_TOKEN_TOLERANCE}
    for c in chunks:
        for t in reference_lengths:
            ref = results.get(f"reference_c{c}", {}).get(str(t))
            if ref is not None:
                speedup = ref["median_s"] / results[f"xla_c{c}"][str(t)]["median_s"]
                targets[f"xla_over_reference_c{c}_T{t}"] = {
                    "speedup": speedup, "target": XLA_OVER_REFERENCE, "pass": speedup >= XLA_OVER_REFERENCE}
    peak = max(results[f"xla_c{c}"][str(t1)]["memory"]["peak_bytes"] for c in chunks)
    targets[f"xla_peak_bytes_T{t1}"] = {"peak_bytes": peak, "cap_bytes": MEMORY_CAP_BYTES,
                                        "pass": peak <= MEMORY_CAP_BYTES, "load_free": True}
    return targets


def run(lengths: Sequence[int], *, chunks: Sequence[int] = (16, 64), reference_lengths: Sequence[int] = (1024,),
        d_model: int = 256, heads: int = 4, batch_size: int | None = 64, warmup: int = 1, reps: int = 3,
        log: Callable[[str], None] | None = None) -> dict:
    """Runs the sweep and returns the JSON-ready report (see the module docstring)."""
    lengths = sorted(set(lengths))
    reference_lengths = sorted(set(reference_lengths) & set(lengths))
    results: dict[str, dict[str, dict]] = {}
    for c in chunks:
        bs = None if batch_size is None else max(batch_size // c, 1) * c  # a multiple of the chunk
        for impl, ts in (("xla", lengths), ("reference", reference_lengths)):
            for t in ts:
                record = measure(d_model, heads, c, bs, t, impl, warmup=warmup, reps=reps)
                record["batch_size"] = bs
                results.setdefault(f"{impl}_c{c}", {})[str(t)] = record
                if log is not None:
                    log(f"{impl:9s} C={c:3d} T={t:6d}: {record['tokens_per_s']:10,.0f} tok/s "
                        f"({record['us_per_token']:.1f} us/token), peak {record['memory']['peak_bytes'] / 2**20:,.0f}"
                        f" MiB, compile {record['compile_s']:.1f} s")
    return {
        "config": {"lengths": lengths, "chunks": list(chunks), "reference_lengths": reference_lengths,
                   "d_model": d_model, "heads": heads, "head_dim": d_model // heads, "expansion": 4,
                   "batch_size": batch_size, "batch": 1, "dtype": "float32", "warmup": warmup, "reps": reps,
                   "platform": jax.default_backend(), "device": str(jax.devices()[0]),
                   "jax_version": jax.__version__},
        "results": results,
        "targets": _targets(results, chunks, lengths, reference_lengths),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {list(DEFAULT_LENGTHS)})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: lengths {list(QUICK_LENGTHS)}, 1 rep")
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 64], help="memory chunk sizes C")
    p.add_argument("--reference-lengths", type=int, nargs="*", default=[1024],
                   help="lengths at which the reference token loop is timed too")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64,
                   help="tokens between gradient-point refreshes (rounded down to a multiple of C); 0: never")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    gate = LoadGate()
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    reps = 1 if args.quick and args.reps == 3 else args.reps
    report = run(lengths, chunks=args.chunks, reference_lengths=args.reference_lengths, d_model=args.d_model,
                 heads=args.heads, batch_size=args.batch_size or None, warmup=args.warmup, reps=reps,
                 log=lambda s: print(s, file=sys.stderr))
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
