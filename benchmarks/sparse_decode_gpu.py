"""sparse_decode_attention's GPU kernel on a GPU: correct against the oracle, and its speed against the op's XLA
gather at 8k and 32k tokens of context (GPU benchmark, run by scripts/gpu_check.sh; bounded to about a minute).

1. Correctness ("check"): at S = `--check-length` (default 4096), bf16 q and caches, token lists and block lists:
   the kernel's o and lse against the float32 oracle (`implementation="reference"` on the float32 inputs), each
   error at most 2x the oracle's own error on the same bf16 inputs (the tests' bf16 rule); "passed" says whether all
   are.
2. Speed at each of `--lengths` (default 8192 32768) and granularity: median of `--reps` jitted decode steps of the
   kernel (`--kernel`, default "pallas_gpu") and of the "xla" gather, the kernel's max_rel_err_vs_xla, and
   "speedup_vs_xla" (the gather's time over the kernel's). A kernel joins the GPU's default order only where this
   shows it faster (pallas_kernels/block_sparse/decode.py).

Shapes: B 8, 32 query heads on 8 KV heads, D 128, bf16, one list per KV head of `--budget` (default 1024) tokens:
that many random distinct tokens ("token"), or budget / `--block` random distinct blocks of 64 ("block"); lengths S.

Run:   python benchmarks/sparse_decode_gpu.py [--lengths 8192 32768] [--budget 1024] [--out FILE]
       EFFARCH_PALLAS_INTERPRET=1 python benchmarks/sparse_decode_gpu.py --dry-run   (tiny sizes, interpreted, CPU)
"""

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, emit, time_calls

from effarch.pallas_kernels.block_sparse import sparse_decode_attention

GRANULARITIES = ("token", "block")


def selection(args, length: int, granularity: str, seed: int = 0):
    """(idx [B, Hkv, K], cnt [B, Hkv]): K random distinct tokens or blocks per list, unsorted, every slot used."""
    unit = 1 if granularity == "token" else args.block
    n = length // unit
    k = max(1, min(n, args.budget // unit))
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(args.batch * args.kv_heads)])
    idx = idx.reshape(args.batch, args.kv_heads, k).astype(np.int32)
    return jnp.asarray(idx), jnp.full((args.batch, args.kv_heads), k, jnp.int32)


def inputs(args, length: int):
    key = jax.random.split(jax.random.key(0), 3)
    shapes = [(args.batch, args.heads, args.head_dim), (args.batch, length, args.kv_heads, args.head_dim),
              (args.batch, length, args.kv_heads, args.head_dim)]
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(key, shapes)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def step(implementation: str, granularity: str, block: int):
    def attend(q, k, v, idx, cnt):
        return sparse_decode_attention(q, k, v, idx, cnt, granularity=granularity,
                                       block=block if granularity == "block" else None, implementation=implementation)

    return jax.jit(attend)


def check(args) -> dict:
    q, k, v = inputs(args, args.check_length)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    record = {"length": args.check_length}
    passed = True
    for granularity in GRANULARITIES:
        idx, cnt = selection(args, args.check_length, granularity, seed=1)
        truth = step("reference", granularity, args.block)(q, k, v, idx, cnt)
        ref = step("reference", granularity, args.block)(*bf, idx, cnt)
        got = step(args.kernel, granularity, args.block)(*bf, idx, cnt)
        for name, g, r, t in zip(("o", "lse"), got, ref, truth):
            err, ref_err = rel_err(g, t), rel_err(r, t)
            record[f"{granularity}_{name}"] = {"rel_err": err, "reference_bf16_rel_err": ref_err}
            passed &= bool(err <= 2 * ref_err)
    record["passed"] = passed
    return record


def speed(args) -> dict:
    record = {}
    for length in args.lengths:
        q, k, v = (x.astype(jnp.bfloat16) for x in inputs(args, length))
        for granularity in GRANULARITIES:
            idx, cnt = selection(args, length, granularity)
            entry = {"tokens_read_per_list": int(cnt[0, 0]) * (1 if granularity == "token" else args.block),
                     "times_s": {}}
            outputs = {}
            for name in (args.kernel, "xla"):
                fn = step(name, granularity, args.block)
                try:
                    times = time_calls(fn, (q, k, v, idx, cnt), args.warmup, args.reps)
                except Exception as e:  # a path that cannot run here is recorded, not fatal
                    entry["times_s"][name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    continue
                entry["times_s"][name] = {"median": statistics.median(times), "all": times}
                outputs[name] = fn(q, k, v, idx, cnt)[0]
            if len(outputs) == 2:
                entry["max_rel_err_vs_xla"] = rel_err(outputs[args.kernel], outputs["xla"])
                entry["speedup_vs_xla"] = (entry["times_s"]["xla"]["median"]
                                           / entry["times_s"][args.kernel]["median"])
            record[f"{granularity}_S{length}"] = entry
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024, help="cache tokens each list reads")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kernel", default="pallas_gpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (S 64, budget 32, blocks of 16), 1 rep")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gate = LoadGate()
    if args.dry_run:
        args.lengths, args.check_length, args.budget, args.block = [64], 64, 32, 16
        args.batch, args.heads, args.kv_heads, args.head_dim, args.warmup, args.reps = 1, 4, 2, 16, 0, 1
    report = {"device": str(jax.devices()[0].device_kind), "kernel": args.kernel, "budget": args.budget,
              "check": check(args), "speed": speed(args)}
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["check"]["passed"] else 1)
