"""Per-token cost of landmark inference with a block memory vs exact KV-cache decoding, as the context grows.

Claim under test (the landmark paper's, §3): with top-k retrieval, the attention cost per generated token is bounded by
(k + local blocks) * block_len whatever the context length, so time and memory touched per token stay flat.

Setup: one LandmarkAttention layer (d_model 128, 4 heads of 32, L = 50 as in the paper, k = 2), batch 1, float32.
For each context length C the block memory holds C // (L + 1) blocks of random keys and values, and one timed
call decodes `--tokens` tokens in a jitted `lax.scan` of `memory_step`; the state is donated and threaded from call
to call, so the cache is updated in place, as in generation. The baseline is the exact path in the same run:
`decode_step` against a KV cache holding C tokens (the full grouped softmax, O(C) per token). Time per token is the
median call over `--reps` / tokens; the reps go round-robin over the contexts.

Memory touched per token is counted from what the step reads (float32 bytes):
- attention: the k retrieved blocks plus the local block, (k + 1) * (L + 1) * H * (K + V) — bounded;
- landmark scoring: one landmark key per cached block, n_blocks * H * K — grows as C / (L + 1), 1/(2 (L + 1)) of
  a KV cache (the paper's cost too: its cache is scanned for the top-k);
- exact decoding reads the whole KV cache, C * H * (K + V).

Run:   .venv/bin/python benchmarks/landmark_memory_cost.py [--contexts 2048 8192 32768] [--out FILE]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from _common import LoadGate, emit
from flax import nnx

from effarch.layers.landmark import LandmarkAttention, LandmarkConfig

FLAT_TOLERANCE = 0.20  # the target: time and attention memory per token within 20% across contexts


def _filled_memory(layer: LandmarkAttention, context: int, extra: int, key) -> dict:
    """A block memory holding `context` tokens of random keys and values, with room for `extra` more."""
    N = layer.block_size
    n_blocks = context // N
    state = layer.init_memory(1, max_blocks=(context + extra) // N + 1, max_chunk=1)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    mem_k = jax.random.normal(k1, state["mem_k"].shape)
    return dict(
        state,
        mem_k=mem_k,
        mem_lm_k=mem_k[:, :, -1].swapaxes(1, 2),  # random keys: which rotation they carry does not change the cost
        mem_v=jax.random.normal(k2, state["mem_v"].shape),
        loc_k=jax.random.normal(k3, state["loc_k"].shape),
        loc_v=jax.random.normal(k4, state["loc_v"].shape),
        n_blocks=jnp.asarray(n_blocks, jnp.int32),
        pos=jnp.asarray(context, jnp.int32),
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block-len", type=int, default=50)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per timed call")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    gate = LoadGate()
    cfg = LandmarkConfig(n_heads=args.heads, block_len=args.block_len, mem_topk=args.topk)
    layer = LandmarkAttention(args.d_model, cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    H, K, N = cfg.n_heads, layer.head_dim, layer.block_size

    def scan_steps(step_name):
        # `--tokens` decode steps in one jitted scan. The state is donated and threaded from call to call, as in
        # generation (arches/landmark_memory.py): without donation XLA copies the whole cache on entry to every call,
        # an O(context) cost that generation does not pay.
        def run(params, state, xs):
            layer = nnx.merge(graphdef, params)
            return jax.lax.scan(lambda st, x: getattr(layer, step_name)(st, x), state, xs)

        return jax.jit(run, donate_argnums=1)

    def interleaved_per_token(fn, states: dict) -> dict:
        """Median seconds per token for each context; the reps go round-robin over the contexts so that load on the
        shared machine hits every context alike."""
        ys = None
        for _ in range(args.warmup):
            for c in states:
                states[c], ys = fn(params, states[c], xs)
        jax.block_until_ready(ys)
        times = {c: [] for c in states}
        for _ in range(args.reps):
            for c in states:
                start = time.perf_counter()
                states[c], ys = fn(params, states[c], xs)
                jax.block_until_ready(ys)
                times[c].append(time.perf_counter() - start)
        return {c: statistics.median(t) / args.tokens for c, t in times.items()}

    mem_fn, exact_fn = scan_steps("memory_step"), scan_steps("decode_step")
    xs = jax.random.normal(jax.random.key(1), (args.tokens, 1, args.d_model))
    extra = (args.warmup + args.reps) * args.tokens  # tokens decoded past the context over all calls
    mem_states, exact_states = {}, {}
    for c in args.contexts:
        mem_states[c] = _filled_memory(layer, c, extra, jax.random.key(c))
        exact = layer.init_state(1, c + extra)
        exact_states[c] = dict(exact, k=jax.random.normal(jax.random.key(2), exact["k"].shape),
                               v=jax.random.normal(jax.random.key(3), exact["v"].shape), pos=jnp.asarray(c, jnp.int32))
    mem_times, exact_times = interleaved_per_token(mem_fn, mem_states), interleaved_per_token(exact_fn, exact_states)
    results = {"memory": {}, "exact": {}}
    for c in args.contexts:
        n_blocks = c // N
        results["memory"][str(c)] = {
            "median_s_per_token": mem_times[c],
            "n_blocks": n_blocks,
            "attention_bytes_per_token": (cfg.mem_topk + 1) * N * H * 2 * K * 4,
            "landmark_scoring_bytes_per_token": n_blocks * H * K * 4,
        }
        results["exact"][str(c)] = {"median_s_per_token": exact_times[c], "kv_bytes_per_token": c * H * 2 * K * 4}
    first = str(args.contexts[0])

    def per_token(name, c):
        return results[name][str(c)]["median_s_per_token"]

    ratios = {name: {str(c): per_token(name, c) / per_token(name, first) for c in args.contexts} for name in results}
    ratios["memory_over_exact"] = {str(c): per_token("memory", c) / per_token("exact", c) for c in args.contexts}
    mem_times = [results["memory"][str(c)]["median_s_per_token"] for c in args.contexts]
    report = {
        "config": vars(args) | {"block_size": N, "head_dim": K, "backend": jax.default_backend()},
        "results": results,
        "ratios": ratios,
        "targets": {
            "memory_time_flat_within": FLAT_TOLERANCE,
            "memory_time_spread": max(mem_times) / min(mem_times) - 1,
            "memory_time_flat": max(mem_times) / min(mem_times) - 1 <= FLAT_TOLERANCE,
        },
    }
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
