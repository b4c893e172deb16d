"""Block-sparse attention kernel on a GPU: correct against the oracle, and its speed against dense cuDNN flash
attention at 10% density (GPU benchmark, run by scripts/gpu_check.sh; bounded to about a minute).

1. Correctness ("check"): at T = `--check-length` (default 4096), bf16 inputs, the kernel's output and dq, dk, dv
   against the float32 oracle (`block_sparse_reference` on the float32 inputs), each error at most 2x the oracle's own
   error on the same bf16 inputs (the tests' bf16 rule); "passed" says whether all four are.
2. Speed at T = `--length` (default 32768), fwd_bwd (jitted value_and_grad of sum(o · cotangent) w.r.t. q, k, v):
   median of `--reps` calls of the kernel (`--kernel`, default "pallas_gpu"), of the op's "xla" path when it has one
   (and its max_rel_err_vs_xla of the kernel's output), and of dense causal attention,
   `jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")` (GPU only, else recorded as skipped).
   "speedup_vs_cudnn" is cuDNN's time over the kernel's; the issue's target is ≥ 5x at 32k, 10% density.

Shapes: B 1, H 16 query heads on 4 KV heads, D 128, bf16, 128-token blocks, one list per KV head; each query block
lists its own block plus random earlier ones, `--density` of all blocks (a causal pattern, unsorted).

Run:   python benchmarks/block_sparse_gpu.py [--length 32768] [--density 0.1] [--out FILE]
       EFFARCH_PALLAS_INTERPRET=1 python benchmarks/block_sparse_gpu.py --dry-run   (tiny sizes, interpreted, CPU)
"""

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, emit, loss_and_grads, time_calls

from effarch.pallas_kernels.block_sparse import api, block_sparse_reference, random_causal_lists

TARGET_VS_CUDNN = 5.0


def causal_lists(batch: int, groups: int, n_blocks: int, density: float, seed: int = 0):
    """`random_causal_lists` with about `density` of the n_blocks blocks per row, as device arrays."""
    idx, cnt = random_causal_lists(batch, groups, n_blocks, max(1, round(density * n_blocks)), rng=seed)
    return jnp.asarray(idx), jnp.asarray(cnt)


def inputs(args, t_len: int, dtype):
    key = jax.random.split(jax.random.key(0), 4)
    shapes = [(args.batch, t_len, args.heads, args.head_dim), (args.batch, t_len, args.kv_heads, args.head_dim),
              (args.batch, t_len, args.kv_heads, args.head_dim), (args.batch, t_len, args.heads, args.head_dim)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(key, shapes)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check(args) -> dict:
    t_len = args.check_length
    q, k, v, ct = inputs(args, t_len, jnp.float32)
    idx, cnt = causal_lists(args.batch, args.kv_heads, t_len // args.block, args.density)

    def op(implementation):
        def attend(q, k, v):
            if implementation == "reference":
                return block_sparse_reference(q, k, v, idx, cnt, q_block=args.block, kv_block=args.block)
            return api.block_sparse_attention(q, k, v, idx, cnt, q_block=args.block, kv_block=args.block,
                                              implementation=implementation)
        return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](ct.astype(q.dtype)) + (attend(q, k, v),))

    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    truth = op("reference")(q, k, v)
    ref = op("reference")(*bf)
    got = op(args.kernel)(*bf)
    record = {"length": t_len}
    passed = True
    for name, g, r, t in zip(("dq", "dk", "dv", "o"), got, ref, truth):
        err, ref_err = rel_err(g, t), rel_err(r, t)
        record[name] = {"rel_err": err, "reference_bf16_rel_err": ref_err}
        passed &= bool(err <= 2 * ref_err)
    record["passed"] = passed
    return record


def speed(args) -> dict:
    t_len = args.length
    q, k, v, ct = inputs(args, t_len, jnp.bfloat16)
    idx, cnt = causal_lists(args.batch, args.kv_heads, t_len // args.block, args.density)
    paths = {
        args.kernel: lambda q, k, v: api.block_sparse_attention(q, k, v, idx, cnt, q_block=args.block,
                                                                kv_block=args.block, implementation=args.kernel),
    }
    if "xla" in api.IMPLEMENTATIONS:
        paths["xla"] = lambda q, k, v: api.block_sparse_attention(q, k, v, idx, cnt, q_block=args.block,
                                                                  kv_block=args.block, implementation="xla")
    if jax.default_backend() == "gpu":
        paths["dense/cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                            implementation="cudnn")
    record = {"length": t_len, "density": args.density, "times_s": {}}
    outputs = {}
    for name, attend in paths.items():
        fn = jax.jit(loss_and_grads(attend))
        try:
            times = time_calls(fn, (q, k, v, ct), args.warmup, args.reps)
        except Exception as e:  # a path that cannot run here (cuDNN version, memory) is recorded, not fatal
            record["times_s"][name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        record["times_s"][name] = {"median": statistics.median(times), "all": times}
        outputs[name] = jax.jit(attend)(q, k, v)
    if "xla" in outputs:
        record["max_rel_err_vs_xla"] = rel_err(outputs[args.kernel], outputs["xla"])
    if "dense/cudnn" not in paths:
        record["times_s"]["dense/cudnn"] = {"skipped": "needs a GPU"}
    kernel, cudnn = record["times_s"][args.kernel], record["times_s"]["dense/cudnn"]
    if "median" in kernel and "median" in cudnn:
        record["speedup_vs_cudnn"] = cudnn["median"] / kernel["median"]
        record["meets_target"] = record["speedup_vs_cudnn"] >= TARGET_VS_CUDNN
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--kernel", default="pallas_gpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (T 64, blocks of 16, D 16), 1 rep")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gate = LoadGate()
    if args.dry_run:
        args.length = args.check_length = 64
        args.block, args.head_dim, args.heads, args.kv_heads, args.reps, args.density = 16, 16, 2, 1, 1, 0.5
    report = {"device": str(jax.devices()[0].device_kind), "kernel": args.kernel, "check": check(args),
              "speed": speed(args), "target_speedup_vs_cudnn": TARGET_VS_CUDNN}
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["check"]["passed"] else 1)
