"""DiffQKV (Sigma, arXiv 2501.13629): KV-cache bytes vs GQA with the same query heads, and decode time per token.

Cache bytes (exact, no timing): for each head layout the bytes per token per layer are read from the layer's
`state_size` and checked against the arrays of its `init_state` (shapes only, via jax.eval_shape). Layouts: the
paper's Sigma-1.5B attention (n_q 32, n_k 4, n_v 16, d_h 64), the same with K head dim 32 cached and up-projected,
and the GQA baseline with the same 32 query heads and 16 KV heads (the paper's 37.5% reduction is
1 - (4 + 16) / (16 + 16)). Totals are given at each context length in bfloat16 (2 bytes).

Decode time: one `decode_step` of a single layer (batch 1, float32 cache) at position `context` of a cache of
`context + 1` slots filled with random keys and values, jitted with the cache donated (updated in place, as in a
serving loop), median of `--reps` calls after a warmup; the paths
of one context are timed in turn, one call each per round, so load on a shared machine hits them alike. Layers
share d_model and query heads: "gqa" is `layers.attention.Attention` (n_kv = n_v), "diffqkv" is
`layers.diffqkv.DiffQKVAttention` with n_k = n_v / 4 and without AugQ (so the difference is the attention and the
cache, not the query MLP), "diffqkv_augq" adds AugQ (1.5 d_model), "diffqkv_selv" adds selective V (top 100).
Ratios are against "gqa" at the same context, measured in the same run.

Run:   .venv/bin/python benchmarks/diffqkv.py [--quick] [--contexts 2048 8192 32768] [--out FILE]
"""

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from _common import LoadGate, emit, platform_info, sweep
from flax import nnx

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.diffqkv import DiffQKVAttention, DiffQKVConfig

DEFAULT_CONTEXTS = (2048, 8192, 32768)
QUICK_CONTEXTS = (256, 1024)
PATHS = ("gqa", "diffqkv", "diffqkv_augq", "diffqkv_selv")
SELECT_TOP_N = 100


def _cache_bytes_per_token(layer, cache_dtype) -> dict:
    """state_size(1) and the bytes of the k / v arrays init_state builds, per token (shapes only)."""
    state = jax.eval_shape(lambda: layer.init_state(1, 8, cache_dtype=cache_dtype))
    arrays = sum(state[name].size * jnp.dtype(state[name].dtype).itemsize for name in ("k", "v")) // 8
    return {"state_size": layer.state_size(1, cache_dtype=cache_dtype), "init_state_arrays": int(arrays)}


def cache_report(contexts: Sequence[int], *, d_model: int = 2048, cache_dtype=jnp.bfloat16) -> dict:
    """Bytes of KV cache per layer for the paper's layouts (exact, from the layers' own accounting)."""
    layouts = {
        "gqa_32q_16kv": lambda: Attention(d_model, AttentionConfig(n_heads=32, n_kv_heads=16), rngs=nnx.Rngs(0)),
        "diffqkv_32q_4k_16v": lambda: DiffQKVAttention(
            d_model, DiffQKVConfig(n_q_heads=32, n_k_heads=4, n_v_heads=16, aug_q=False), rngs=nnx.Rngs(0)
        ),
        "diffqkv_32q_4k_16v_kdim32": lambda: DiffQKVAttention(
            d_model, DiffQKVConfig(n_q_heads=32, n_k_heads=4, n_v_heads=16, k_cache_dim=32, aug_q=False),
            rngs=nnx.Rngs(0),
        ),
    }
    out = {}
    for name, build in layouts.items():
        layer = nnx.eval_shape(build)
        per_token = _cache_bytes_per_token(layer, cache_dtype)
        out[name] = {
            "bytes_per_token": per_token["state_size"],
            "init_state_bytes_per_token": per_token["init_state_arrays"],
            "bytes_at_context": {str(t): layer.state_size(t, cache_dtype=cache_dtype) for t in contexts},
        }
    base = out["gqa_32q_16kv"]["bytes_per_token"]
    for record in out.values():
        record["reduction_vs_gqa"] = 1 - record["bytes_per_token"] / base
    return out


def _layer(path: str, d_model: int, n_q: int, n_v: int, head_dim: int):
    if path == "gqa":
        return Attention(d_model, AttentionConfig(n_heads=n_q, n_kv_heads=n_v, head_dim=head_dim), rngs=nnx.Rngs(0))
    cfg = DiffQKVConfig(n_q_heads=n_q, n_k_heads=max(n_v // 4, 1), n_v_heads=n_v, head_dim=head_dim, aug_q=False)
    if path == "diffqkv_augq":
        cfg = dataclasses.replace(cfg, aug_q=True)
    elif path == "diffqkv_selv":
        cfg = dataclasses.replace(cfg, select_v_top_n=SELECT_TOP_N)
    elif path != "diffqkv":
        raise ValueError(f"unknown path {path!r}; choose from {PATHS}")
    return DiffQKVAttention(d_model, cfg, rngs=nnx.Rngs(0))


def decode_step_fn(path: str, context: int, *, d_model: int, n_q: int, n_v: int, head_dim: int, seed: int = 0):
    """(jitted step, its args, record) for one decode_step at position `context` (cache of context + 1 slots)."""
    layer = _layer(path, d_model, n_q, n_v, head_dim)
    state = layer.init_state(1, context + 1)
    keys = jax.random.split(jax.random.key(seed), 3)
    state = {
        "k": jax.random.normal(keys[0], state["k"].shape, state["k"].dtype),
        "v": jax.random.normal(keys[1], state["v"].shape, state["v"].dtype),
        "pos": jnp.asarray(context, jnp.int32),
    }
    x_t = jax.random.normal(keys[2], (1, d_model), jnp.float32)
    graphdef, params = nnx.split(layer)

    # The cache is donated, so the step writes its slot in place as a serving loop would, instead of copying the
    # whole cache each call; the timing loop feeds the returned cache back with pos reset to `context`.
    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, state, x_t):
        return nnx.merge(graphdef, params).decode_step(state, x_t)

    record = {"cache_bytes": int(state["k"].nbytes + state["v"].nbytes), "state_size": layer.state_size(context + 1)}
    return step, [params, state, x_t], record


def measure_context(paths: Sequence[str], context: int, *, warmup: int, reps: int, **dims) -> dict[str, dict]:
    """Median seconds per decode_step of every path at one context. The paths are timed in turn, one call each per
    round, so a burst of load on the shared machine hits all of them alike."""
    fns = {path: decode_step_fn(path, context, **dims) for path in paths}
    times = {path: [] for path in paths}

    def call(path: str) -> float:
        step, args, _ = fns[path]
        start = time.perf_counter()
        state, y_t = jax.block_until_ready(step(*args))
        elapsed = time.perf_counter() - start
        if not bool(jnp.all(jnp.isfinite(y_t))):
            raise RuntimeError(f"{path}: decode step at context {context} gave non-finite outputs")
        args[1] = {**state, "pos": jnp.asarray(context, jnp.int32)}
        return elapsed

    for path in paths:
        for _ in range(warmup):
            call(path)
    for _ in range(reps):
        for path in paths:
            times[path].append(call(path))
    return {path: {"median_s": statistics.median(times[path]), "times_s": times[path], **fns[path][2]}
            for path in paths}


def run(
    contexts: Sequence[int],
    *,
    paths: Sequence[str] = PATHS,
    d_model: int = 512,
    n_q: int = 8,
    n_v: int = 4,
    head_dim: int = 64,
    warmup: int = 2,
    reps: int = 20,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Cache bytes at the paper's layout, then decode time per token per path and context (module docstring)."""
    contexts = sorted(set(contexts))

    # The paths of one context are timed together (measure_context), the first time any of them is asked for.
    @functools.cache
    def measured(context: str) -> dict[str, dict]:
        return measure_context(paths, int(context), warmup=warmup, reps=reps, d_model=d_model, n_q=n_q, n_v=n_v,
                               head_dim=head_dim)

    def line(path, context, record):
        return (f"{path:13s} context={int(context):6d} {record['median_s'] * 1e3:8.3f} ms/token, "
                f"cache {record['cache_bytes'] / 2**20:8.2f} MiB")

    decode = sweep(paths, [str(c) for c in contexts], lambda path, context: measured(context)[path], log=log,
                   line=line)
    ratios = {}
    if "gqa" in decode:
        for path, per_context in decode.items():
            ratios[path] = {t: r["median_s"] / decode["gqa"][t]["median_s"] for t, r in per_context.items()}
    return {
        "config": {
            "contexts": contexts,
            "d_model": d_model,
            "n_q_heads": n_q,
            "n_v_heads": n_v,
            "n_k_heads": max(n_v // 4, 1),
            "head_dim": head_dim,
            "select_v_top_n": SELECT_TOP_N,
            "batch": 1,
            "decode_cache_dtype": "float32",
            "warmup": warmup,
            "reps": reps,
            **platform_info(),
        },
        "cache_bytes_bf16": cache_report(contexts),
        "decode": decode,
        "decode_time_ratio_vs_gqa": ratios,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", help=f"decode positions (default {list(DEFAULT_CONTEXTS)})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: contexts {list(QUICK_CONTEXTS)}, 3 reps")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-q-heads", type=int, default=8)
    p.add_argument("--n-v-heads", type=int, default=4, help="also the GQA KV heads; n_k = n_v / 4")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, --quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    gate = LoadGate()
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)
    reps = args.reps if args.reps is not None else (3 if args.quick else 20)
    report = run(contexts, paths=args.paths, d_model=args.d_model, n_q=args.n_q_heads, n_v=args.n_v_heads,
                 head_dim=args.head_dim, warmup=args.warmup, reps=reps, log=lambda line: print(line, file=sys.stderr))
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
