"""Per-token decode time of a GQA attention layer reading its KV cache through each KV policy (layers/kv_policies/),
against the full cache, from 2k to 32k tokens of context (issue #23's "per-token decode time at a fixed budget stays
flat" line).

For each context length C and policy: the layer's decode state is sized C + warmup + steps, a random prompt of C
tokens is prefilled (chunks of `--chunk`, dense, building the policy's own state as `effarch generate` does), then
`--steps` decode steps are timed one by one after `--warmup` untimed ones, through `_common.time_decode_steps` (the
state is donated and fed back, so XLA updates the cache in place, as a serving loop would). Reported per (policy, C):
the median, mean and minimum microseconds per token, and per policy the ratio of its median at the longest context
to the shortest, and of its mean ("flat" when both are at most `--flat` = 1.2: the mean counts the steps of a policy
that chooses every N steps, `quest_every8` = `quest every=8`, at their share). Every policy reads `--budget` KV
tokens per query head and step; the full cache reads C. `retrieval_ivf` is `retrieval index=ivf`; `duo` is the layer
with DuoAttention gates set by hand so that half its KV heads read the full cache (the others `--budget` sink +
recent tokens); `razor` reads a made-up heads file in which one query head (of KV head 0) is the retrieval head, so
again half the KV heads read the full cache. duo and razor (and act) read the whole cache on some heads by design:
they are not expected to be flat, their ratio is reported all the same. Weights and inputs are random: this measures
speed only. Quietness: `_common.OtherLoad` (the CPU other processes used during the run, in cores) and the load
average before and after.

Run:      .venv/bin/python benchmarks/kv_policy_decode.py [--contexts 2048 8192 32768] [--budget 256]
              [--policies full window quest retrieval retrieval_ivf tokenselect longheads duo razor] [--steps 30]
              [--out FILE]
"""

import argparse
import json
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, OtherLoad, emit, platform_info, time_decode_steps
from flax import nnx

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.kv_policies import make_policy

POLICIES = ("full", "window", "quest", "quest_every8", "retrieval", "retrieval_ivf", "tokenselect", "longheads", "duo",
            "razor")


def half_full_heads(args) -> np.ndarray:
    """[Hkv] 1.0 for the first half of the KV heads (duo's full heads), 0.0 for the rest."""
    return (np.arange(args.kv_heads) < max(1, args.kv_heads // 2)).astype(np.float32)


def with_policy(policy: str, args) -> Attention:
    """The benchmark's layer, reading its cache through `policy` ("full": none)."""
    duo = policy == "duo"
    layer = Attention(args.d_model, AttentionConfig(n_heads=args.heads, n_kv_heads=args.kv_heads, duo_gates=duo),
                      rngs=nnx.Rngs(0))
    budget = f"budget={args.budget}"
    if policy == "full":
        return layer
    if duo:
        layer.duo_gate[...] = jnp.asarray(half_full_heads(args))
        chosen = make_policy("duo", [budget, "n_sink=4", "full=0.5"]).for_mixers([layer]).for_layer(0)
    elif policy == "razor":
        # One query head of KV head 0 scores highest: KV head 0 reads its full cache, the others sinks + window.
        scores = [[1.0 if h == 0 else 0.0 for h in range(args.heads)]]
        path = os.path.join(tempfile.mkdtemp(prefix="kv_policy_decode_"), "heads.json")
        with open(path, "w") as f:
            json.dump({"scores": scores}, f)
        chosen = make_policy("razor", [budget, f"heads={path}", "top=1"]).for_layer(0)
    elif policy == "retrieval_ivf":
        chosen = make_policy("retrieval", [budget, "index=ivf"])
    elif policy == "quest_every8":
        chosen = make_policy("quest", [budget, "every=8"])
    else:
        chosen = make_policy(policy, [budget])
    layer.set_kv_policy(chosen)
    return layer


def measure(policy: str, context: int, args) -> dict:
    """Median / min microseconds per decode step after a prefill of `context` random tokens."""
    layer = with_policy(policy, args)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, context, args.d_model)), jnp.float32)
    graphdef, params = nnx.split(layer)

    @jax.jit
    def prefill(state, params, x):
        return nnx.merge(graphdef, params).prefill(state, x)

    state = layer.init_state(args.batch, context + args.warmup + args.steps)
    for start in range(0, context, args.chunk):
        state, _ = prefill(state, params, x[:, start:start + args.chunk])
    times, first = time_decode_steps(layer, state, x[:, -1], warmup=args.warmup, steps=args.steps)
    return {"median_us": 1e6 * statistics.median(times), "mean_us": 1e6 * statistics.fmean(times),
            "min_us": 1e6 * min(times), "first_call_s": first}


def plot(results: dict, contexts: list[int], path: str) -> None:
    """Median microseconds per token against the context (log2 axes), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, per_context in results.items():
        ax.plot(contexts, [per_context[str(c)]["median_us"] for c in contexts], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (µs per token, median)")
    ax.set_title("KV policies vs the full cache, one GQA layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--budget", type=int, default=256, help="KV tokens read per query head and step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per call")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--flat", type=float, default=1.2,
                   help="the longest/shortest ratio (of medians and of means) that counts as flat")
    p.add_argument("--out", default=None, help="JSON path (a PNG is written beside it)")
    args = p.parse_args(argv)
    gate = LoadGate()
    load_before = os.getloadavg()[0]
    with OtherLoad() as other:
        results = {policy: {str(c): measure(policy, c, args) for c in args.contexts} for policy in args.policies}
    lo, hi = str(min(args.contexts)), str(max(args.contexts))
    summary = {}
    for policy, r in results.items():
        ratio, mean_ratio = (r[hi][m] / r[lo][m] for m in ("median_us", "mean_us"))
        summary[policy] = {"ratio_longest_to_shortest": ratio, "mean_ratio": mean_ratio,
                           "flat": policy != "full" and max(ratio, mean_ratio) <= args.flat}
    report = {"config": {**vars(args), **platform_info()}, "results": results, "summary": summary,
              "load_before": load_before, "load_after": os.getloadavg()[0], "other_load_cores": other.cores,
              "quiet": other.quiet}
    for policy, r in results.items():
        line = " ".join(f"{c}: {r[str(c)]['median_us']:.0f}" for c in args.contexts)
        print(f"{policy:12s} µs/token {line}  ratio {summary[policy]['ratio_longest_to_shortest']:.2f} "
              f"(of means {summary[policy]['mean_ratio']:.2f})")
    if args.out:
        plot(results, args.contexts, os.path.splitext(args.out)[0] + ".png")
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
