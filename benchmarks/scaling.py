"""BASED linear attention vs softmax attention as the context grows: training step time and memory, decode cost.

Paper claim under test: BASED (arXiv 2402.18668) trains in time linear in T and decodes with a constant-size state
(§3.1, "recall-throughput tradeoff"), while softmax attention's training cost is quadratic and its KV cache grows.

Training (op level, no projections): for each T the timed function is the jitted value_and_grad (w.r.t. q, k, v) of
sum(out * cotangent), float32, batch B. Paths:
- `based_xla`: `based_linear_attention(implementation="xla")`, the chunked scan (chunk `--chunk-size`);
- `based_reference`: `implementation="reference"`, the quadratic oracle that builds the [T, T] weights;
- `softmax_xla`: `dot_product_attention(causal=True, implementation="xla")`.
BASED gets q, k [B, T, H, F] and v [B, T, H, V]; softmax gets q, k, v [B, T, H, V] (a standard head of width V).
Time is the median of `--reps` calls after `--warmup` calls, reported per token (median / (B T)). Memory is XLA's
compiled memory analysis (CPU has no device memory statistics): peak = arguments + outputs + temporaries - aliased.
A quadratic path whose compiled temporaries exceed `--max-gib` is compiled (for its memory numbers) but not run,
and is listed under "skipped".

Decoding (layer level, B = 1, d_model = H V): one jitted, state-donating `decode_step` of
`layers.based.BasedLinearAttention` (F, H heads of width V) and of `layers.attention.Attention` (H heads of width V,
RoPE, a KV cache), after a context of L tokens. BASED's state comes from `prefill` on L random inputs; the softmax
cache is filled with random keys and values and its position set to L (a decode step's cost does not depend on the
cached values, and a real prefill at 16k would be the quadratic pass). Time is the median of `--decode-steps` single
steps after warmup; state bytes are `state_size(L)` (what a query needs) and the bytes of the allocated state.

Defaults (chosen to fit 2 CPU cores): B = 1, H = 2, F = 16, V = 64, chunk 64, T and L in {1k, 2k, 4k, 8k, 16k}.

Targets (our BASED acceptance numbers), evaluated on the lengths measured and reported under "targets":
- based_xla per-token time at the longest T within 1.5x of the shortest (16k vs 1k);
- based_xla at least 5x faster than based_reference at 8k (or the longest T where both ran);
- BASED decode per-token time and state bytes flat in the context length (max / min - 1 <= 0.10).

Run:   .venv/bin/python benchmarks/scaling.py [--quick] [--out FILE]
"""

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from _common import (
    LoadGate,
    by_str,
    compile_and_time,
    emit,
    loss_and_grads,
    platform_info,
    skipped,
    sweep,
    time_decode_steps,
)
from flax import nnx

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.based import BasedConfig, BasedLinearAttention
from effarch.pallas_kernels.attention import dot_product_attention
from effarch.pallas_kernels.based import based_linear_attention

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 4096)
TRAIN_PATHS = ("based_xla", "based_reference", "softmax_xla")
QUADRATIC_PATHS = ("based_reference", "softmax_xla")
DECODE_PATHS = ("based", "softmax")
XLA_FLAT_MAX_RATIO = 1.5
XLA_MIN_SPEEDUP = 5.0
SPEEDUP_LENGTH = 8192
DECODE_FLAT_TOLERANCE = 0.10


def _train_fn(path: str, chunk_size: int) -> Callable:
    """The op under test, (q, k, v) -> [B, T, H, V]."""
    if path == "based_xla":
        return lambda q, k, v: based_linear_attention(q, k, v, chunk_size=chunk_size, implementation="xla")
    if path == "based_reference":
        return lambda q, k, v: based_linear_attention(q, k, v, implementation="reference")
    if path == "softmax_xla":
        return lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="xla")
    raise ValueError(f"unknown path {path!r}; choose from {TRAIN_PATHS}")


def _train_inputs(path: str, batch: int, t_len: int, heads: int, feature_dim: int, value_dim: int, seed: int):
    qk_dim = value_dim if path == "softmax_xla" else feature_dim
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, t_len, heads, qk_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, t_len, heads, qk_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, t_len, heads, value_dim), jnp.float32)
    cotangent = jax.random.normal(kc, (batch, t_len, heads, value_dim), jnp.float32)
    return q, k, v, cotangent


def measure_train(
    path: str,
    t_len: int,
    *,
    batch: int,
    heads: int,
    feature_dim: int,
    value_dim: int,
    chunk_size: int,
    warmup: int,
    reps: int,
    max_temp_bytes: int | None,
    seed: int = 0,
) -> dict:
    """Compiles and times one (path, T) forward + backward; "skipped" replaces the timings past the memory cap."""
    args = _train_inputs(path, batch, t_len, heads, feature_dim, value_dim, seed)
    record = compile_and_time(loss_and_grads(_train_fn(path, chunk_size)), args, warmup=warmup, reps=reps,
                              max_temp_bytes=max_temp_bytes)
    if "median_s" in record:
        record["per_token_s"] = record["median_s"] / (batch * t_len)
    return record


def _decode_layer(path: str, heads: int, feature_dim: int, value_dim: int) -> nnx.Module:
    d_model = heads * value_dim
    rngs = nnx.Rngs(0)
    if path == "based":
        return BasedLinearAttention(d_model, BasedConfig(feature_dim=feature_dim, n_heads=heads), rngs=rngs)
    if path == "softmax":
        return Attention(d_model, AttentionConfig(n_heads=heads), rngs=rngs)
    raise ValueError(f"unknown decode path {path!r}; choose from {DECODE_PATHS}")


def _context_state(path: str, layer: nnx.Module, context: int, extra_slots: int, seed: int):
    """The layer's decode state after `context` tokens (see the module docstring for how each is built)."""
    key_x, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    if path == "based":
        x = jax.random.normal(key_x, (1, context, layer.d_model), jnp.float32)
        state, _ = jax.jit(lambda s, x: layer.prefill(s, x))(layer.init_state(1, context), x)
        return state
    state = layer.init_state(1, context + extra_slots)
    shape = state["k"].shape
    return {
        "k": jax.random.normal(key_k, shape, state["k"].dtype),
        "v": jax.random.normal(key_v, shape, state["v"].dtype),
        "pos": jnp.asarray(context, jnp.int32),
    }


def measure_decode(
    path: str, context: int, *, heads: int, feature_dim: int, value_dim: int, warmup: int, steps: int, seed: int = 0
) -> dict:
    """Per-token time of one jitted decode step after `context` tokens, and the state's size."""
    layer = _decode_layer(path, heads, feature_dim, value_dim)
    state = _context_state(path, layer, context, warmup + steps, seed)
    x_t = jax.random.normal(jax.random.key(seed + 1), (1, layer.d_model), jnp.float32)
    allocated = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    times, compile_s = time_decode_steps(layer, state, x_t, warmup=max(warmup, 1), steps=steps)
    return {
        "per_token_s": statistics.median(times),
        "times_s": times,
        "first_call_s": compile_s,
        "state_bytes": int(layer.state_size(context)),
        "allocated_state_bytes": int(allocated),
    }


def _flatness(values: dict[int, float]) -> float:
    return max(values.values()) / min(values.values()) - 1


def _targets(train: dict[str, dict[int, dict]], decode: dict[str, dict[int, dict]]) -> dict:
    """Checks the acceptance targets on the measured lengths."""
    targets = {}
    def timed(path):
        return {t: r for t, r in train.get(path, {}).items() if "per_token_s" in r}
    xla, ref = timed("based_xla"), timed("based_reference")
    if len(xla) >= 2:
        t0, t1 = min(xla), max(xla)
        ratio = xla[t1]["per_token_s"] / xla[t0]["per_token_s"]
        targets["based_xla_per_token_time_flat"] = {
            "lengths": [t0, t1],
            "ratio_longest_to_shortest": ratio,
            "max_ratio": XLA_FLAT_MAX_RATIO,
            "pass": ratio <= XLA_FLAT_MAX_RATIO,
        }
    both = sorted(set(xla) & set(ref))
    if both:
        t_cmp = SPEEDUP_LENGTH if SPEEDUP_LENGTH in both else both[-1]
        speedup = ref[t_cmp]["median_s"] / xla[t_cmp]["median_s"]
        targets["based_xla_vs_reference_speedup"] = {
            "length": t_cmp,
            "speedup": speedup,
            "min_speedup": XLA_MIN_SPEEDUP,
            "pass": speedup >= XLA_MIN_SPEEDUP,
        }
    based = decode.get("based", {})
    if len(based) >= 2:
        for key, name in (("per_token_s", "based_decode_time_flat"), ("state_bytes", "based_decode_state_bytes_flat")):
            spread = _flatness({t: r[key] for t, r in based.items()})
            targets[name] = {
                "lengths": sorted(based),
                "max_over_min_minus_1": spread,
                "tolerance": DECODE_FLAT_TOLERANCE,
                "pass": spread <= DECODE_FLAT_TOLERANCE,
                "load_free": key == "state_bytes",  # a byte count: the load cannot change it
            }
    return targets


def run(
    lengths: Sequence[int],
    *,
    decode_lengths: Sequence[int] | None = None,
    train_paths: Sequence[str] = TRAIN_PATHS,
    batch: int = 1,
    heads: int = 2,
    feature_dim: int = 16,
    value_dim: int = 64,
    chunk_size: int = 64,
    warmup: int = 1,
    reps: int = 5,
    decode_steps: int = 50,
    max_gib: float | None = 4.0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Runs the training and decoding sweeps and returns the JSON-ready report (see the module docstring)."""
    lengths = sorted(set(lengths))
    decode_lengths = lengths if decode_lengths is None else sorted(set(decode_lengths))
    max_temp = None if max_gib is None else int(max_gib * 2**30)
    def train_line(path, t_len, record):
        speed = f"{record['per_token_s'] * 1e6:9.3f} us/token" if "per_token_s" in record else record["skipped"]
        return f"train  {path:16s} T={t_len:6d} {speed}, peak {record['memory']['peak_bytes'] / 2**20:,.1f} MiB"

    def decode_line(path, context, record):
        return (f"decode {path:16s} L={context:6d} {record['per_token_s'] * 1e6:9.1f} us/token, "
                f"state {record['state_bytes'] / 2**10:,.1f} KiB")

    train = sweep(train_paths, lengths, lambda path, t_len: measure_train(
        path, t_len, batch=batch, heads=heads, feature_dim=feature_dim, value_dim=value_dim, chunk_size=chunk_size,
        warmup=warmup, reps=reps, max_temp_bytes=max_temp if path in QUADRATIC_PATHS else None,
    ), log=log, line=train_line)
    decode = sweep(DECODE_PATHS, decode_lengths, lambda path, context: measure_decode(
        path, context, heads=heads, feature_dim=feature_dim, value_dim=value_dim, warmup=max(warmup, 2),
        steps=decode_steps,
    ), log=log, line=decode_line)
    return {
        "config": {
            "lengths": lengths,
            "decode_lengths": decode_lengths,
            "batch": batch,
            "heads": heads,
            "feature_dim": feature_dim,
            "value_dim": value_dim,
            "based_chunk_size": chunk_size,
            "dtype": "float32",
            "warmup": warmup,
            "reps": reps,
            "decode_steps": decode_steps,
            "max_temp_gib": max_gib,
            **platform_info(),
        },
        "train": by_str(train),
        "skipped": skipped(train),
        "decode": by_str(decode),
        "targets": _targets(train, decode),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help=f"training lengths T (default {list(DEFAULT_LENGTHS)})")
    p.add_argument("--decode-lengths", type=int, nargs="+", help="decode context lengths L (default: --lengths)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: lengths {list(QUICK_LENGTHS)}, 2 reps")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--feature-dim", type=int, default=16, help="BASED F")
    p.add_argument("--value-dim", type=int, default=64, help="V (also softmax's head width)")
    p.add_argument("--chunk-size", type=int, default=64, help="BASED xla chunk C")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 50, --quick 20)")
    p.add_argument("--paths", nargs="+", choices=TRAIN_PATHS, default=list(TRAIN_PATHS), help="training paths")
    p.add_argument("--max-gib", type=float, default=4.0,
                   help="skip quadratic lengths whose compiled temporaries exceed this; <= 0 disables the cap")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    gate = LoadGate()
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    report = run(
        lengths,
        decode_lengths=args.decode_lengths,
        train_paths=args.paths,
        batch=args.batch,
        heads=args.heads,
        feature_dim=args.feature_dim,
        value_dim=args.value_dim,
        chunk_size=args.chunk_size,
        warmup=args.warmup,
        reps=args.reps if args.reps is not None else (2 if args.quick else 5),
        decode_steps=args.decode_steps if args.decode_steps is not None else (20 if args.quick else 50),
        max_gib=args.max_gib if args.max_gib > 0 else None,
        log=lambda line: print(line, file=sys.stderr),
    )
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
