"""Roofline of every sequence-mixing op on the CPU: achieved GFLOP/s of useful work, fwd and fwd+bwd, against the
machine's matmul throughput measured in the same run; and (`--sweep`) each op's efficiency length against softmax
attention's XLA path.

Setup: op level (pallas_kernels/), float32, batch `--batch` (1), each op's default CPU path, at the head shapes of
the configs/lm/ config that uses it:
    op                 config                        shapes
    softmax_xla        attention_512.yaml            H 4, K = V = 32, causal: jax.nn.dot_product_attention(xla)
    attention          attention_512.yaml            the same through pallas_kernels/attention (default CPU path)
    sliding_window     based_small.yaml              H 2, K = V = 64, window W = 64
    based              based_small.yaml              H 2, F 16 (P = 1 + F + F(F+1)/2 = 153), V 64, chunk C 64
    lightning          tnl_small.yaml                H 4, K = V = 32, block C 64, the layer's decay rates (layer 0/4)
    titans_c16         titans_mac_small.yaml         H 2, D 64, memory MLP D -> F 128 -> D (expansion 2), chunk
                                                     C 16, mini-batch 64 tokens (the configs' chunk_size)
    titans_c64         (the same, chunk C 64)        chunk C 64, mini-batch 64 tokens
    landmark           landmark_small.yaml           H 4, K = V = 32, a landmark after every 15 tokens, tile 64
    diffqkv            diffqkv_small.yaml            Hq 8, Hk 2, Hv 4, K = V = 16
    moh                moh_small.yaml                H 4, K = V = 32, 2 shared + top-1 of 2 routed heads (A = 3 per
                                                     token, routes drawn at random), w_o [H, V, 128]
    block_sparse       sink_window_small.yaml heads  H 4, K = V = 32, blocks 64 x 64, density `--density` (0.1):
                                                     random causal lists (the diagonal + Kmax - 1 earlier blocks)
Inputs are random normal (q, k scaled by K^-1/2). fwd is the jitted op; fwd+bwd is the jitted value_and_grad of
sum(out * cotangent) w.r.t. every float input (q, k, v; also gates and w_o for MoH; the memory's initial weights,
theta, eta and alpha for Titans).

Useful FLOPs, matmul work only (2 per multiply-add) of the algorithm each op runs; causal pairs counted once (a
masked half of a diagonal block is not useful work); feature-map selection matmuls, padding, softmax, norms and
elementwise recurrences are not counted; fwd+bwd = 3 x fwd (the usual convention: recomputation in a backward is not
useful work). With pairs(T) = T(T+1)/2, per batch row:
    softmax, attention, landmark   2 (K + V) H pairs(T)            (landmark: every causal pair is scored once,
                                                                    grouped softmax through the block's landmark)
    sliding_window                 2 (K + V) H [W(W+1)/2 + (T - W) W]           (T >= W)
    diffqkv                        2 (K + V) Hq pairs(T)
    moh                            2 (K + V) A pairs(T) + 2 A V D T            (A active heads, output projection)
    block_sparse                   2 (K + V) H [b^2 (listed off-diagonal blocks) + b(b+1)/2 (diagonal blocks)]
    based     (N = T / C chunks)   H N [(F + V) C(C+1) + 4 C P V]: q k^T and w V on the causal pairs of a chunk,
                                   phi(Q) S and the state update phi(K)^T V
    lightning (N = T / C chunks)   H N [(K + V) C(C+1) + 4 C K V]: the same with K-dim keys, no feature map
    titans                         14 D F H T: per token, the chunk gradient at Wref (forward k w1, h w2: 4DF;
                                   backward dW2, dh, dW1: 6DF) and the retrieval M_W(q) (4DF); independent of C
Target (issue #24): BASED and Titans fwd+bwd at 4k at >= 50% of the big matmul's throughput ("targets"; "loaded"
instead of pass/fail on a loaded machine).
The machine's throughput, measured in the same run, before and after the ops: a jitted 2048 x 2048 x 2048 float32
matmul and 4096 batched 64 x 64 x 64 matmuls, best of `--reps`; "machine" holds the faster of the two measurements.
Each op's time is the median (and min) of its timed calls after one warmup, `--reps` calls or as many as fit in
`--case-seconds`; "gflops" is useful FLOPs over the median, "fraction_of_matmul" the op's best call against the big
matmul's best (like for like). A case whose compiled temporaries exceed
`--max-gib` (10) is compiled, not run ("skipped", with its memory): at T = 16k the [H, T, T] scores of softmax_xla,
attention and moh need 8 GiB forward and 20 GiB forward + backward, more than a 24 GiB host shared with others.

`--sweep`: fwd+bwd only, T = 256 .. 16384 (x2; `--lengths` overrides), then per op its efficiency length: the
smallest swept T from which it is faster than softmax_xla at every longer swept T where both ran (None when
never), and a log-log PNG of time against T beside the JSON (matplotlib, a default dependency).

Load: `_common.LoadGate` records the 1-minute load average before and after; above 1.5 the report is marked
"loaded" (the numbers only show that the benchmark works).

Run:   .venv/bin/python benchmarks/roofline_cpu.py [--ops based titans_c16] [--lengths 1024 4096 16384]
           [--out benchmarks/results/roofline_cpu.json]
       .venv/bin/python benchmarks/roofline_cpu.py --sweep [--out benchmarks/results/roofline_sweep_cpu.json]
"""

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, emit, memory_stats, platform_info, time_calls

from effarch.pallas_kernels.attention import dot_product_attention
from effarch.pallas_kernels.based import based_linear_attention
from effarch.pallas_kernels.block_sparse import block_sparse_attention, random_causal_lists
from effarch.pallas_kernels.diffqkv import diffqkv_attention
from effarch.pallas_kernels.landmark import landmark_attention
from effarch.pallas_kernels.lightning import lightning_attention
from effarch.pallas_kernels.lightning.decay import tnl_decay
from effarch.pallas_kernels.moh import mixture_of_heads_attention
from effarch.pallas_kernels.sliding_window import sliding_window_attention
from effarch.pallas_kernels.titans import neural_memory_scan

DEFAULT_LENGTHS = (1024, 4096, 16384)
SWEEP_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
BASELINE = "softmax_xla"


def pairs(t: int) -> int:
    """Causal (query, key) pairs of T tokens, the diagonal included."""
    return t * (t + 1) // 2


@dataclass
class Case:
    """One op at one T: fn(*args) -> output; `diff` the argnums differentiated; `fwd_flops` useful FLOPs. The inputs
    are made on first use of `args` (the FLOP count needs none)."""

    fn: Callable
    make_args: Callable[[], tuple]
    diff: tuple[int, ...]
    fwd_flops: float
    info: dict

    @functools.cached_property
    def args(self) -> tuple:
        return self.make_args()


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _qkv(key, b, t, hq, hk, hv, k_dim, v_dim):
    kq, kk, kv = jax.random.split(key, 3)
    return (_normal(kq, (b, t, hq, k_dim), k_dim**-0.5), _normal(kk, (b, t, hk, k_dim), k_dim**-0.5),
            _normal(kv, (b, t, hv, v_dim)))


def softmax_xla(b: int, t: int, key, **_) -> Case:
    h, d = 4, 32

    def fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    return Case(fn, lambda: _qkv(key, b, t, h, h, h, d, d), (0, 1, 2), 2 * (d + d) * h * pairs(t) * b, {"H": h, "K": d})


def attention(b: int, t: int, key, **_) -> Case:
    h, d = 4, 32
    return Case(lambda q, k, v: dot_product_attention(q, k, v, causal=True), lambda: _qkv(key, b, t, h, h, h, d, d),
                (0, 1, 2), 2 * (d + d) * h * pairs(t) * b, {"H": h, "K": d})


def sliding_window(b: int, t: int, key, **_) -> Case:
    h, d, w = 2, 64, 64
    visible = pairs(min(t, w)) + max(t - w, 0) * w
    return Case(lambda q, k, v: sliding_window_attention(q, k, v, window=w), lambda: _qkv(key, b, t, h, h, h, d, d),
                (0, 1, 2), 2 * (d + d) * h * visible * b, {"H": h, "K": d, "window": w})


def based(b: int, t: int, key, **_) -> Case:
    h, f, v_dim, c = 2, 16, 64, 64
    p = 1 + f + f * (f + 1) // 2
    n = -(-t // c)
    flops = h * n * ((f + v_dim) * c * (c + 1) + 4 * c * p * v_dim) * b
    return Case(lambda q, k, v: based_linear_attention(q, k, v, chunk_size=c),
                lambda: _qkv(key, b, t, h, h, h, f, v_dim),
                (0, 1, 2), flops, {"H": h, "F": f, "P": p, "V": v_dim, "C": c})


def lightning(b: int, t: int, key, **_) -> Case:
    h, d, c = 4, 32, 64
    n = -(-t // c)
    flops = h * n * ((d + d) * c * (c + 1) + 4 * c * d * d) * b
    return Case(lambda q, k, v: lightning_attention(q, k, v, tnl_decay(h, 0, 4), block_size=c),
                lambda: _qkv(key, b, t, h, h, h, d, d), (0, 1, 2), flops, {"H": h, "K": d, "C": c})


def _titans(chunk: int) -> Callable[..., Case]:
    def make(b: int, t: int, key, **_) -> Case:
        h, d, f, mini = 2, 64, 128, 64

        def args():
            keys = jax.random.split(key, 8)
            q, k, v = _qkv(keys[0], b, t, h, h, h, d, d)
            n = t // chunk
            params = {"w1": _normal(keys[1], (h, d, f), d**-0.5), "w2": _normal(keys[2], (h, f, d), f**-0.5)}
            lr = 0.1 * jax.random.uniform(keys[3], (b, t, h))
            eta = jax.random.uniform(keys[4], (b, n, h), minval=0.8, maxval=0.99)
            alpha = jax.random.uniform(keys[5], (b, n, h), minval=0.0, maxval=0.05)
            return params, k, v, q, lr, eta, alpha

        def fn(params, k, v, q, lr, eta, alpha):
            return neural_memory_scan(params, k, v, q, lr, eta, alpha, chunk_size=chunk, batch_size=mini)

        return Case(fn, args, tuple(range(7)), 14 * d * f * h * t * b,
                    {"H": h, "D": d, "F": f, "C": chunk, "batch_size": mini})

    return make


def landmark(b: int, t: int, key, **_) -> Case:
    h, d, every, tile = 4, 32, 16, 64
    is_lm = np.broadcast_to(np.arange(t) % every == every - 1, (b, t))
    return Case(lambda q, k, v, m: landmark_attention(q, k, v, m, block_size=tile),
                lambda: (*_qkv(key, b, t, h, h, h, d, d), jnp.asarray(is_lm)), (0, 1, 2),
                2 * (d + d) * h * pairs(t) * b, {"H": h, "K": d, "block_len": every - 1, "tile": tile})


def diffqkv(b: int, t: int, key, **_) -> Case:
    hq, hk, hv, d = 8, 2, 4, 16
    return Case(lambda q, k, v: diffqkv_attention(q, k, v, causal=True),
                lambda: _qkv(key, b, t, hq, hk, hv, d, d),
                (0, 1, 2), 2 * (d + d) * hq * pairs(t) * b, {"Hq": hq, "Hk": hk, "Hv": hv, "K": d})


def moh(b: int, t: int, key, **_) -> Case:
    h, d, d_model, shared = 4, 32, 128, 2
    active = shared + 1

    def args():
        k1, k2, k3, k4 = jax.random.split(key, 4)
        routed = shared + jax.random.randint(k2, (b, t, 1), 0, h - shared)
        heads = jnp.concatenate([jnp.broadcast_to(jnp.arange(shared), (b, t, shared)), routed], axis=-1)
        gates = jax.random.uniform(k3, (b, t, active), minval=0.5, maxval=1.0)
        w_o = _normal(k4, (h, d, d_model), (h * d) ** -0.5)
        return (*_qkv(k1, b, t, h, h, h, d, d), heads, gates, w_o)

    flops = (2 * (d + d) * active * pairs(t) + 2 * active * d * d_model * t) * b
    return Case(lambda q, k, v, heads, gates, w_o: mixture_of_heads_attention(q, k, v, heads, gates, w_o),
                args, (0, 1, 2, 4, 5), flops,
                {"H": h, "K": d, "active_heads": active, "d_model": d_model})


def block_sparse(b: int, t: int, key, density: float = 0.1, **_) -> Case:
    h, d, blk = 4, 32, 64
    n = -(-t // blk)
    kmax = max(1, round(density * n))
    idx, cnt = random_causal_lists(b, h, n, kmax, rng=0)
    listed = int(cnt.sum())  # every list holds its diagonal block once
    visible = (listed - b * h * n) * blk * blk + b * h * n * pairs(blk)
    return Case(lambda q, k, v, idx, cnt: block_sparse_attention(q, k, v, idx, cnt, q_block=blk, kv_block=blk),
                lambda: (*_qkv(key, b, n * blk, h, h, h, d, d), jnp.asarray(idx), jnp.asarray(cnt)), (0, 1, 2),
                2 * (d + d) * visible, {"H": h, "K": d, "block": blk, "kmax": kmax,
                                        "listed_fraction_of_causal_blocks": listed / (b * h * n * (n + 1) / 2)})


OPS: dict[str, Callable[..., Case]] = {
    "softmax_xla": softmax_xla, "attention": attention, "sliding_window": sliding_window, "based": based,
    "lightning": lightning, "titans_c16": _titans(16), "titans_c64": _titans(64), "landmark": landmark,
    "diffqkv": diffqkv, "moh": moh, "block_sparse": block_sparse,
}


def fwd_bwd(case: Case) -> Callable:
    """(*args, cotangent) -> (sum(out * cotangent), grads of the `diff` args)."""

    def loss(*a):
        *args, ct = a
        return jnp.sum(case.fn(*args) * ct)

    return jax.value_and_grad(loss, argnums=case.diff)


def time_compiled(compiled, args, *, reps: int, case_seconds: float) -> list[float]:
    """One untimed warmup call (timed to size the run), then up to `reps` timed calls (at least 2) in the budget."""
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
    n = max(2, min(reps, int(min(case_seconds / max(first, 1e-6), reps))))
    return time_calls(compiled, args, warmup=0, reps=n)


def measure_case(case: Case, mode: str, *, reps: int, case_seconds: float, max_temp_bytes: int) -> dict:
    """Compile, cap on compiled temporaries, time; GFLOP/s of useful work over the median and the min."""
    if mode == "fwd":
        fn, args, flops = case.fn, case.args, case.fwd_flops
    else:
        out = jax.eval_shape(case.fn, *case.args)
        fn, args, flops = fwd_bwd(case), (*case.args, jnp.ones(out.shape, out.dtype)), 3 * case.fwd_flops
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    record = {"useful_flops": float(flops), "compile_s": time.perf_counter() - start,
              "memory": memory_stats(compiled)}
    if record["memory"]["temp_bytes"] > max_temp_bytes:
        record["skipped"] = (f"compiled temporaries {record['memory']['temp_bytes'] / 2**30:.2f} GiB exceed "
                             f"--max-gib {max_temp_bytes / 2**30:.2f}; not run")
        return record
    times = time_compiled(compiled, args, reps=reps, case_seconds=case_seconds)
    med, best = statistics.median(times), min(times)
    record.update(median_s=med, min_s=best, times_s=times, gflops=flops / med / 1e9, gflops_best=flops / best / 1e9)
    return record


def matmul_throughput(reps: int) -> dict:
    """GFLOP/s of a jitted 2048^3 float32 matmul and of 4096 batched 64^3 matmuls, best and median of `reps`."""
    out = {}
    for name, (a_shape, b_shape) in {"matmul_2048": ((2048, 2048), (2048, 2048)),
                                     "batched_64x64_4096": ((4096, 64, 64), (4096, 64, 64))}.items():
        ka, kb = jax.random.split(jax.random.key(1))
        a, b = _normal(ka, a_shape), _normal(kb, b_shape)
        flops = 2 * math.prod(a_shape) * b_shape[-1]
        compiled = jax.jit(jnp.matmul).lower(a, b).compile()
        times = time_compiled(compiled, (a, b), reps=reps, case_seconds=float("inf"))
        out[name] = {"flops": flops, "min_s": min(times), "median_s": statistics.median(times),
                     "gflops_best": flops / min(times) / 1e9, "gflops_median": flops / statistics.median(times) / 1e9}
    return out


TARGET_OPS = ("based", "titans_c16", "titans_c64")  # issue #24: >= 50% of the matmul throughput at 4k fwd+bwd
TARGET_LENGTH, TARGET_FRACTION = 4096, 0.5


def targets(results: dict[str, dict[str, dict]]) -> dict:
    """Per op of TARGET_OPS measured at TARGET_LENGTH fwd+bwd: its fraction of the big matmul against
    TARGET_FRACTION ("pass" becomes "loaded" on a loaded machine: `LoadGate.stamp`)."""
    out = {}
    for op in TARGET_OPS:
        r = results.get(op, {}).get(str(TARGET_LENGTH), {}).get("fwd_bwd", {})
        if "fraction_of_matmul" in r:
            out[f"{op}_fwd_bwd_{TARGET_LENGTH}_fraction_of_matmul"] = {
                "fraction": r["fraction_of_matmul"], "min": TARGET_FRACTION,
                "pass": r["fraction_of_matmul"] >= TARGET_FRACTION}
    return out


def efficiency_lengths(results: dict[str, dict[str, dict]], lengths: Sequence[int]) -> dict:
    """Per op, the smallest T from which its fwd+bwd median beats softmax_xla's at every longer T where both ran
    (None when no such T, or when softmax_xla ran at none of them)."""
    base = results.get(BASELINE, {})
    out = {}
    for op, per_t in results.items():
        if op == BASELINE:
            continue
        both = [t for t in lengths if "median_s" in per_t.get(str(t), {}).get("fwd_bwd", {})
                and "median_s" in base.get(str(t), {}).get("fwd_bwd", {})]
        faster = [per_t[str(t)]["fwd_bwd"]["median_s"] < base[str(t)]["fwd_bwd"]["median_s"] for t in both]
        length = None
        for i in range(len(both) - 1, -1, -1):  # walk down from the longest while it stays faster
            if not faster[i]:
                break
            length = both[i]
        out[op] = length
    return out


def plot(results: dict, lengths: Sequence[int], path: str) -> None:
    """fwd+bwd median seconds against T, log-log, one line per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.get_cmap("tab20").colors  # more ops than the default cycle's 10 colours
    for i, (op, per_t) in enumerate(results.items()):
        pts = [(t, per_t[str(t)]["fwd_bwd"]["median_s"]) for t in lengths
               if "median_s" in per_t.get(str(t), {}).get("fwd_bwd", {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=op, color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                    linewidth=2.5 if op == BASELINE else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("fwd+bwd seconds (median)")
    ax.set_title("op fwd+bwd time vs T, float32 CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ops: Sequence[str], lengths: Sequence[int], modes: Sequence[str], *, batch: int, reps: int,
        case_seconds: float, max_gib: float, density: float, log: Callable[[str], None] | None = None) -> dict:
    """Every (op, T, mode), between two measurements of the matmuls; the fractions are against the faster one (a
    load spike at one end of the run does not inflate them)."""
    before = matmul_throughput(reps)
    if log:
        log("matmul: " + ", ".join(f"{n} {r['gflops_best']:.1f} GFLOP/s" for n, r in before.items()))
    peak = before["matmul_2048"]["gflops_best"]  # provisional, for the log lines
    results: dict[str, dict[str, dict]] = {}
    for op in ops:
        results[op] = {}
        for t in lengths:
            case = OPS[op](batch, t, jax.random.key(0), density=density)
            per_mode = {"shapes": case.info}
            for mode in modes:
                r = measure_case(case, mode, reps=reps, case_seconds=case_seconds, max_temp_bytes=int(max_gib * 2**30))
                if "gflops_best" in r:
                    r["fraction_of_matmul"] = r["gflops_best"] / peak
                per_mode[mode] = r
                if log:
                    log(f"{op:15s} T={t:6d} {mode:8s} " + (r["skipped"] if "skipped" in r else
                        f"{r['median_s']:.4f} s  {r['gflops']:.1f} GFLOP/s  {100 * r['fraction_of_matmul']:.1f}% "
                        "of matmul"))
            results[op][str(t)] = per_mode
    after = matmul_throughput(reps)
    machine = {n: max(before[n], after[n], key=lambda r: r["gflops_best"]) for n in before}
    peak = machine["matmul_2048"]["gflops_best"]
    for per_t in results.values():
        for per_mode in per_t.values():
            for r in per_mode.values():
                if "gflops_best" in r:
                    r["fraction_of_matmul"] = r["gflops_best"] / peak
    if log:
        log("matmul after: " + ", ".join(f"{n} {r['gflops_best']:.1f} GFLOP/s" for n, r in after.items()))
    return {"machine": machine, "machine_before_and_after": {"before": before, "after": after}, "results": results}


def table(report: dict) -> str:
    """The markdown table of benchmarks/README.md: GFLOP/s (fraction of the big matmul) per op, T and mode."""
    cfg, res = report["config"], report["results"]
    cols = [(t, m) for t in cfg["lengths"] for m in cfg["modes"]]
    head = "| op | " + " | ".join(f"{m} {t}" for t, m in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for op, per_t in res.items():
        cells = []
        for t, m in cols:
            r = per_t.get(str(t), {}).get(m, {})
            cells.append(f"{r['gflops']:.1f} ({100 * r['fraction_of_matmul']:.0f}%)" if "gflops" in r else "—")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), help=f"any of {list(OPS)}")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths T (default 1024 4096 16384; --sweep: "
                   "256 .. 16384)")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], help="default both (--sweep: fwd_bwd)")
    p.add_argument("--sweep", action="store_true", help="fwd+bwd over T 256 .. 16384: efficiency lengths and a PNG")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed calls per case at most (at least 2)")
    p.add_argument("--case-seconds", type=float, default=8.0, help="time budget of a case's timed calls")
    p.add_argument("--max-gib", type=float, default=10.0, help="cases whose compiled temporaries exceed this: not run")
    p.add_argument("--density", type=float, default=0.1, help="block_sparse: fraction of key blocks listed")
    p.add_argument("--out", help="the JSON report (default benchmarks/results/roofline_cpu.json, --sweep: "
                   "roofline_sweep_cpu.json); the --sweep PNG goes beside it")
    p.add_argument("--no-out", action="store_true", help="print the JSON only")
    a = p.parse_args(argv)
    unknown = [op for op in a.ops if op not in OPS]
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {list(OPS)}")
    if any(t < 1 for t in a.lengths or ()):
        p.error(f"--lengths must be positive, got {a.lengths}")
    if not 0 < a.density <= 1:
        p.error(f"--density must be in (0, 1], got {a.density}")
    lengths = a.lengths or list(SWEEP_LENGTHS if a.sweep else DEFAULT_LENGTHS)
    modes = a.modes or (["fwd_bwd"] if a.sweep else ["fwd", "fwd_bwd"])
    out = None if a.no_out else (a.out or f"benchmarks/results/roofline{'_sweep' if a.sweep else ''}_cpu.json")
    gate = LoadGate()
    report = run(a.ops, lengths, modes, batch=a.batch, reps=a.reps, case_seconds=a.case_seconds, max_gib=a.max_gib,
                 density=a.density, log=lambda s: print(s, file=sys.stderr, flush=True))
    report = {"benchmark": "roofline_cpu", "config": {"ops": a.ops, "lengths": lengths, "modes": modes,
              "batch": a.batch, "reps": a.reps, "case_seconds": a.case_seconds, "max_gib": a.max_gib,
              "density": a.density, "dtype": "float32", **platform_info()}, **report}
    report["targets"] = targets(report["results"])
    if a.sweep and "fwd_bwd" in modes:
        report["efficiency_length_vs_softmax_xla"] = efficiency_lengths(report["results"], lengths)
    emit(gate.stamp(report), out)
    print(("LOADED machine (numbers only show it works):\n" if report["load"]["loaded"] else "") + table(report),
          file=sys.stderr)
    if a.sweep and out:
        plot(report["results"], lengths, out.removesuffix(".json") + ".png")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
