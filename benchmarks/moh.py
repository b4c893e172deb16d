"""MoH: cost of attention + output projection at 100%, 75% and 50% active heads (FLOPs, decode time per token).

Paper claim under test (MoH, arXiv 2410.11842): routing each token to a subset of heads saves compute. The savings
exist only if inactive heads are skipped, not multiplied by zero: the "sparse" path of
`pallas_kernels/moh` computes only the active (token, head) pairs, the "dense" path computes every head.

Setup: one `MoHAttention` layer, d_model 512, H = 8 heads of 64 (MHA), 2 shared heads, learned router, float32,
B = 1. The active share is (2 + top_k) / 8 with top_k = 6, 4, 2 (100%, 75%, 50%).
- FLOPs: XLA's compiled cost analysis (`cost_analysis()["flops"]`) of `mixture_of_heads_attention` alone (the
  attention + projection part) on a parallel T-token sequence, and of the whole layer's forward pass (projections
  and router included).
- Decode: the per-token time of the op alone (one query against a KV cache of L random entries: the part MoH
  shrinks) and of the layer's jitted, state-donating `decode_step` (q/k/v projections of every head, router,
  cache write included), median of `--steps` calls after a warmup. Cache bytes = `state_size(L)`.
Ratios are against 100% of the same path in the same run. Targets: sparse FLOPs at 50% below 0.7x of 100%, sparse
op decode time at 50% below 0.85x of 100%.

Run:   .venv/bin/python benchmarks/moh.py [--quick] [--contexts 2048 8192] [--out FILE]
"""

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, emit, sweep, time_calls, time_decode_steps
from flax import nnx

from effarch.layers.moh import MoHAttention, MoHConfig
from effarch.pallas_kernels.moh import mixture_of_heads_attention

PATHS = ("dense", "sparse")
HEADS, N_SHARED = 8, 2
SHARES = {"100": 6, "75": 4, "50": 2}  # active share (%) -> top_k: (2 + top_k) / 8 heads active
TARGET_FLOPS_RATIO = 0.7
TARGET_DECODE_RATIO = 0.85


def _layer(path: str, top_k: int, *, d_model: int, heads: int, head_dim: int, block_size: int) -> MoHAttention:
    cfg = MoHConfig(n_heads=heads, n_shared=N_SHARED, top_k=top_k, head_dim=head_dim, implementation=path,
                    block_size=block_size)
    return MoHAttention(d_model, cfg, rngs=nnx.Rngs(0))


def _flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def _routing(layer: MoHAttention, x):
    q = layer.project_qkv(x, jnp.arange(x.shape[1]))[0]
    return layer.route(x, q)


def measure_flops(layer: MoHAttention, t_len: int, seed: int) -> dict:
    """Compiled FLOPs of the op alone and of the layer's forward on a parallel sequence of t_len tokens."""
    x = jax.random.normal(jax.random.key(seed), (1, t_len, layer.d_model), jnp.float32)
    q, k, v = layer.project_qkv(x, jnp.arange(t_len))
    routing = _routing(layer, x)
    w_o = layer._w_o()

    # The heads are an argument, not a closed-over constant, which XLA would fold (the sort) at compile time.
    def op(q, k, v, heads, gates, w_o):
        return mixture_of_heads_attention(q, k, v, heads, gates, w_o, block_size=layer.moh.block_size,
                                          implementation=layer.moh.implementation)

    return {"op_flops": _flops(op, q, k, v, routing.heads, routing.gates, w_o),
            "layer_flops": _flops(lambda m, x: m(x), layer, x)}


def measure_decode(layer: MoHAttention, context: int, *, warmup: int, steps: int, seed: int) -> dict:
    """Per-token decode time of the op alone and of the layer's decode_step after `context` cached tokens."""
    keys = jax.random.split(jax.random.key(seed), 4)
    state = layer.init_state(1, context + warmup + steps + 1)
    state = {"k": jax.random.normal(keys[0], state["k"].shape), "v": jax.random.normal(keys[1], state["v"].shape),
             "pos": jnp.asarray(context, jnp.int32)}
    x_t = jax.random.normal(keys[2], (1, layer.d_model), jnp.float32)
    q = layer.project_qkv(x_t[:, None], jnp.asarray([context]))[0]
    routing = _routing(layer, x_t[:, None])
    positions = jnp.asarray([context], jnp.int32)
    op = jax.jit(lambda q, k, v, heads, gates, w_o, positions: mixture_of_heads_attention(
        q, k, v, heads, gates, w_o, q_positions=positions, block_size=layer.moh.block_size,
        implementation=layer.moh.implementation))
    args = (q, state["k"], state["v"], routing.heads, routing.gates, layer._w_o(), positions)
    op_times = time_calls(op, args, warmup, steps)
    times, _ = time_decode_steps(layer, state, x_t, warmup=warmup, steps=steps)
    return {"op_per_token_s": statistics.median(op_times), "layer_per_token_s": statistics.median(times),
            "cache_bytes": int(layer.state_size(context))}


def run(contexts, *, t_len: int, d_model: int, head_dim: int, block_size: int, warmup: int, steps: int,
        paths=PATHS, seed: int = 0) -> dict:
    heads, fractions = HEADS, SHARES

    def measure(path: str, frac: str) -> dict:
        top_k = fractions[frac]
        layer = _layer(path, top_k, d_model=d_model, heads=heads, head_dim=head_dim, block_size=block_size)
        return {"active_heads": N_SHARED + top_k, "top_k": top_k, **measure_flops(layer, t_len, seed),
                "decode": {str(c): measure_decode(layer, c, warmup=warmup, steps=steps, seed=seed) for c in contexts}}

    results = sweep(paths, list(fractions), measure, log=lambda line: print(line, file=sys.stderr),
                    line=lambda path, frac, rec: f"{path} {frac}%: op GFLOP {rec['op_flops'] / 1e9:.3f}")
    ratios = {}
    for path, per_frac in results.items():
        base = per_frac["100"]
        ratios[path] = {frac: {
            "op_flops": rec["op_flops"] / base["op_flops"],
            "layer_flops": rec["layer_flops"] / base["layer_flops"],
            **{f"op_decode_{c}": rec["decode"][c]["op_per_token_s"] / base["decode"][c]["op_per_token_s"]
               for c in rec["decode"]},
            **{f"layer_decode_{c}": rec["decode"][c]["layer_per_token_s"] / base["decode"][c]["layer_per_token_s"]
               for c in rec["decode"]},
        } for frac, rec in per_frac.items()}
    targets = {}
    half = ratios.get("sparse", {}).get("50")
    longest = str(max(contexts))
    if half is not None:
        targets = {
            "sparse_op_flops_50_vs_100": {"value": half["op_flops"], "target": f"< {TARGET_FLOPS_RATIO}",
                                          "pass": bool(half["op_flops"] < TARGET_FLOPS_RATIO), "load_free": True},
            f"sparse_op_decode_{longest}_50_vs_100": {
                "value": half[f"op_decode_{longest}"], "target": f"< {TARGET_DECODE_RATIO}",
                "pass": bool(half[f"op_decode_{longest}"] < TARGET_DECODE_RATIO)},
        }
    config = {"paths": list(paths), "contexts": list(contexts), "flops_seq_len": t_len, "d_model": d_model,
              "heads": heads, "head_dim": head_dim, "n_shared": N_SHARED, "block_size": block_size, "warmup": warmup,
              "steps": steps,
              "jax": jax.__version__, "backend": jax.default_backend(), "numpy": np.__version__}
    return {"config": config, "results": results, "ratios": ratios, "targets": targets}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--seq-len", type=int, default=1024, help="T of the parallel pass whose FLOPs are counted")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--quick", action="store_true", help="contexts 1024, 10 steps")
    p.add_argument("--out")
    a = p.parse_args(argv)
    gate = LoadGate()
    if a.quick:
        a.contexts, a.steps = [1024], 10
    report = run(a.contexts, t_len=a.seq_len, d_model=a.d_model, head_dim=a.head_dim,
                 block_size=a.block_size, warmup=a.warmup, steps=a.steps, paths=tuple(a.paths))
    return emit(gate.stamp(report), a.out)


if __name__ == "__main__":
    main()
