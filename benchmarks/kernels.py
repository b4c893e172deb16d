"""Speed of the Lightning and BASED Pallas kernels against their XLA paths and cuDNN flash attention (GPU benchmark).

For each sequence length T, mode ("fwd": the op; "fwd_bwd": jitted value_and_grad of sum(out · cotangent) w.r.t.
q, k, v) and path, the median of `--reps` timed calls after a warmup, all in one run so that the ratios compare like
with like:

- lightning/<kernel>, lightning/xla: `lightning_attention(implementation=...)`, K = V = `--head-dim`, TNL decay of
  the first of 2 layers;
- based/<kernel>, based/xla: `based_linear_attention(implementation=...)`, F = `--feature-dim`, V = `--head-dim`;
- softmax/cudnn: `jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`, head dim `--head-dim`
  (GPU only; recorded as skipped elsewhere).

<kernel> is `--kernel` (default "pallas_gpu"). Inputs are bfloat16 by default (`--dtype`), [B, T, H, X] with the
same B·H at every T (default B 16, H 16: 256 programs, about two per SM of an H100/H200). Each record carries the
achieved TFLOP/s (the algorithm's matmul FLOPs, `flops()`) and bandwidth (one read of every input and one write of
every output, `min_bytes()`), and their fractions of the chip's peak when the device is in `PEAKS`. Every timed
kernel output is also compared with the XLA path on the same inputs ("max_rel_err_vs_xla"), so a GPU run checks
the compiled kernels' numbers too.

Targets (ours, on an H100/H200-class GPU, at the longest T, fwd_bwd): each kernel ≥ 10x faster than cuDNN
flash attention and ≥ 2x faster than its XLA path. flash-linear-attention's Triton kernels are not run here (PyTorch
is not on the GPU image); that comparison stays open.

Run:   python benchmarks/kernels.py [--lengths 2048 8192 32768] [--out FILE]
       EFFARCH_PALLAS_INTERPRET=1 python benchmarks/kernels.py --dry-run   (tiny sizes, interpreted, any CPU)
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, emit, loss_and_grads, time_calls

from effarch.pallas_kernels.based import based_linear_attention
from effarch.pallas_kernels.lightning import lightning_attention, tnl_decay

DEFAULT_LENGTHS = (2048, 8192, 32768)
MODES = ("fwd", "fwd_bwd")
# Dense bf16 tensor-core TFLOP/s and HBM TB/s (vendor datasheets, SXM parts).
PEAKS = {
    "H100": {"tflops_bf16": 989.0, "hbm_tb_s": 3.35},
    "H200": {"tflops_bf16": 989.0, "hbm_tb_s": 4.8},
}
TARGET_VS_CUDNN = 10.0
TARGET_VS_XLA = 2.0


def flops(op: str, mode: str, b: int, t: int, h: int, k: int, v: int, chunk: int, features: int = 0) -> float:
    """Matmul FLOPs of one call (2 per multiply-add) as the kernels compute them, per chunk of C tokens:

    lightning  fwd: QKᵀ, (·)V, QS, KᵀV = 2C²(K+V) + 4CKV. bwd pass 1 (dOVᵀ, (·)K, dOSᵀ, state): 2C²(K+V) + 4CKV;
               pass 2 (QKᵀ, dOVᵀ, (·)ᵀQ, (·)ᵀdO, VdSᵀ, KdS, QᵀdO): 4C²(K+V) + 6CKV.
    based      (K = F, P padded features, a feature map = two C×F×P selection matmuls, M = 4CFP)
               fwd: QKᵀ, WV, φ(Q)S, φ(K)ᵀV and two maps = 2C²(F+V) + 4CPV + 2M. bwd pass 1 (the forward's reads,
               dW, dS K, dφ(Q), its vjp, the state update): 4C²(F+V) + 6CPV + 3M; pass 2 (QKᵀ, dW, dSᵀQ, WᵀdNum,
               φ(K)dS, VdSᵀ, vjp, φ(Q), the dS update): 4C²(F+V) + 6CPV + 3M.
    softmax    (causal, half the T² work): fwd 4·T²/2·K per head, fwd_bwd 3.5x that (the flash-attention convention).
    """
    n = b * h * -(-t // chunk)
    c = chunk
    if op == "lightning":
        fwd = 2 * c * c * (k + v) + 4 * c * k * v
        bwd = 6 * c * c * (k + v) + 10 * c * k * v
        return float(n * (fwd if mode == "fwd" else fwd + bwd))
    if op == "based":
        p = features
        fmap = 4 * c * k * p
        fwd = 2 * c * c * (k + v) + 4 * c * p * v + 2 * fmap
        bwd = 8 * c * c * (k + v) + 12 * c * p * v + 6 * fmap
        return float(n * (fwd if mode == "fwd" else fwd + bwd))
    if op == "softmax":
        fwd = 4.0 * b * h * t * t / 2 * k
        return fwd if mode == "fwd" else 3.5 * fwd
    raise ValueError(f"unknown op {op!r}")


def min_bytes(mode: str, b: int, t: int, h: int, k: int, v: int, itemsize: int) -> float:
    """Bytes every implementation must move at least: q, k, v in and o out (fwd); plus the cotangent in and
    dq, dk, dv out (fwd_bwd)."""
    fwd = b * t * h * (2 * k + 2 * v) * itemsize
    return float(fwd if mode == "fwd" else fwd + b * t * h * (v + 2 * k + v) * itemsize)


def _peak(device) -> dict | None:
    kind = getattr(device, "device_kind", "")
    return next((p for name, p in PEAKS.items() if name in kind), None)


def _op_fn(op: str, path: str, heads: int, chunk: int) -> Callable:
    if op == "lightning":
        decay = tnl_decay(heads, 0, 2)
        return lambda q, k, v: lightning_attention(q, k, v, decay, block_size=chunk, implementation=path)
    if op == "based":
        return lambda q, k, v: based_linear_attention(q, k, v, chunk_size=chunk, implementation=path)
    if op == "softmax":
        if jax.default_backend() != "gpu":
            raise NotImplementedError(f"cuDNN attention needs a GPU, not {jax.default_backend()}")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=path)
    raise ValueError(f"unknown op {op!r}")


def _inputs(op: str, b: int, t: int, h: int, head_dim: int, feature_dim: int, dtype, seed: int):
    rng = np.random.default_rng(seed)
    qk_dim = feature_dim if op == "based" else head_dim
    shapes = ((b, t, h, qk_dim), (b, t, h, qk_dim), (b, t, h, head_dim), (b, t, h, head_dim))
    # Small inputs keep Lightning's undecayed sums and BASED's 1 + s + s²/2 in range at 32k tokens.
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32) * 0.1, dtype) for s in shapes)


def _rel_err(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def measure(op: str, path: str, mode: str, t: int, cfg: dict, reference_out=None) -> tuple[dict, object]:
    """Compiles and times one case; returns (record, output). The record has "skipped" (the path cannot run here,
    NotImplementedError) or "error" (anything else, so one failure does not end a GPU run) instead of timings."""
    b, h, hd, fd = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["feature_dim"]
    qk_dim = fd if op == "based" else hd
    record = {"op": op, "path": path, "mode": mode, "T": t, "batch": b, "heads": h}
    try:
        attn = _op_fn(op, path, h, cfg["chunk"])
        q, k, v, ct = _inputs(op, b, t, h, hd, fd, cfg["dtype"], cfg["seed"])
        fn = jax.jit(attn if mode == "fwd" else loss_and_grads(attn))
        args = (q, k, v) if mode == "fwd" else (q, k, v, ct)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        record["compile_s"] = time.perf_counter() - start
        out = compiled(*args)
        times = time_calls(compiled, args, cfg["warmup"], cfg["reps"])
    except NotImplementedError as e:
        record["skipped"] = str(e)
        return record, None
    except Exception as e:  # noqa: BLE001 - recorded in the report, the sweep goes on
        record["error"] = f"{type(e).__name__}: {e}"[:2000]
        return record, None
    median = statistics.median(times)
    n_flops = flops(op, mode, b, t, h, qk_dim, hd, cfg["chunk"], _features(fd) if op == "based" else 0)
    n_bytes = min_bytes(mode, b, t, h, qk_dim, hd, jnp.dtype(cfg["dtype"]).itemsize)
    record.update(median_s=median, times_s=times, tflops=n_flops / median / 1e12, tb_s=n_bytes / median / 1e12)
    peak = _peak(jax.devices()[0])
    if peak is not None:
        record["fraction_of_peak_tflops"] = record["tflops"] / peak["tflops_bf16"]
        record["fraction_of_peak_bandwidth"] = record["tb_s"] / peak["hbm_tb_s"]
    if reference_out is not None:
        flat, flat_ref = jax.tree.leaves(out), jax.tree.leaves(reference_out)
        record["max_rel_err_vs_xla"] = max(_rel_err(a, r) for a, r in zip(flat, flat_ref))
    return record, out


def _features(feature_dim: int) -> int:
    from effarch.pallas_kernels.based import chunk_math  # the kernels' padded feature width

    return chunk_math.padded_features(feature_dim)


def _speedups(records: list[dict], kernel: str) -> dict:
    """{op: {mode: {T: {"vs_xla": t_xla / t_kernel, "vs_cudnn": t_cudnn / t_kernel}}}} where both ran."""
    timed = {(r["op"], r["path"], r["mode"], r["T"]): r["median_s"] for r in records if "median_s" in r}
    out: dict = {}
    for (op, path, mode, t), seconds in timed.items():
        if path != kernel:
            continue
        entry = out.setdefault(op, {}).setdefault(mode, {}).setdefault(str(t), {})
        if (op, "xla", mode, t) in timed:
            entry["vs_xla"] = timed[(op, "xla", mode, t)] / seconds
        if ("softmax", "cudnn", mode, t) in timed:
            entry["vs_cudnn"] = timed[("softmax", "cudnn", mode, t)] / seconds
    return out


def _targets(speedups: dict, longest: int) -> dict:
    targets = {}
    for op in ("lightning", "based"):
        entry = speedups.get(op, {}).get("fwd_bwd", {}).get(str(longest), {})
        for key, bound in (("vs_cudnn", TARGET_VS_CUDNN), ("vs_xla", TARGET_VS_XLA)):
            ratio = entry.get(key)
            targets[f"{op}_fwd_bwd_{key}_at_{longest}"] = {
                "ratio": ratio,
                "bound": bound,
                "pass": None if ratio is None else ratio >= bound,
            }
    return targets


def run(
    lengths: Sequence[int],
    *,
    kernel: str = "pallas_gpu",
    batch: int = 16,
    heads: int = 16,
    head_dim: int = 64,
    feature_dim: int = 16,
    chunk: int = 64,
    dtype=jnp.bfloat16,
    modes: Sequence[str] = MODES,
    warmup: int = 1,
    reps: int = 5,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Runs the sweep and returns the JSON-ready report (module docstring)."""
    lengths = sorted(set(lengths))
    cfg = dict(batch=batch, heads=heads, head_dim=head_dim, feature_dim=feature_dim, chunk=chunk, dtype=dtype,
               warmup=warmup, reps=reps, seed=seed)
    records = []
    for t in lengths:
        for mode in modes:
            for op in ("lightning", "based"):
                xla_record, xla_out = measure(op, "xla", mode, t, cfg)
                kernel_record, _ = measure(op, kernel, mode, t, cfg, reference_out=xla_out)
                records += [xla_record, kernel_record]
            records.append(measure("softmax", "cudnn", mode, t, cfg)[0])
            if log is not None:
                for r in records[-5:]:
                    what = f"{r['median_s'] * 1e3:9.2f} ms" if "median_s" in r else r.get("skipped", r.get("error"))
                    log(f"T={t:6d} {mode:8s} {r['op']:9s} {r['path']:10s} {what}")
    speedups = _speedups(records, kernel)
    return {
        "config": {
            "lengths": lengths,
            "kernel": kernel,
            "batch": batch,
            "heads": heads,
            "head_dim": head_dim,
            "feature_dim": feature_dim,
            "chunk": chunk,
            "dtype": jnp.dtype(dtype).name,
            "modes": list(modes),
            "warmup": warmup,
            "reps": reps,
            "platform": jax.default_backend(),
            "device": str(jax.devices()[0]),
            "device_kind": getattr(jax.devices()[0], "device_kind", ""),
            "peak": _peak(jax.devices()[0]),
            "jax_version": jax.__version__,
        },
        "records": records,
        "speedups": speedups,
        "targets": _targets(speedups, lengths[-1]),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help=f"default {list(DEFAULT_LENGTHS)} ([64, 128] with --dry-run)")
    p.add_argument("--kernel", default="pallas_gpu", choices=("pallas_gpu", "pallas_tpu"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes (T 64, 128 unless --lengths; B 1, H 2; 1 rep): checks the script end to end; "
                        "set EFFARCH_PALLAS_INTERPRET=1 off GPU so the kernels run interpreted")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    gate = LoadGate()
    if args.dry_run:
        args.lengths = args.lengths or [64, 128]
        args.batch, args.heads, args.chunk, args.reps, args.warmup = 1, 2, 32, 1, 1
        args.head_dim = min(args.head_dim, 32)
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
    report = run(
        args.lengths,
        kernel=args.kernel,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        feature_dim=args.feature_dim,
        chunk=args.chunk,
        dtype=jnp.dtype(args.dtype).type,
        modes=args.modes,
        warmup=args.warmup,
        reps=args.reps,
        log=lambda line: print(line, file=sys.stderr),
    )
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
