"""Quality against attention density for every `sparse_attention` pattern on one frozen dense model (issue "Learned and
content-routed sparse attention", evidence: one plot with every policy).

The dense softmax-attention run `--base` is converted (arches/convert_sparse_attention.py, every attention weight
kept) to each pattern at a few densities and evaluated on its own task with the run's held-out data: perplexity for
a byte / text LM (`effarch eval RUN perplexity`), exact match for passkey (`effarch eval RUN passkey`). Nothing is
trained here except what each pattern needs to exist: `seer` reads the gates of `--seer`, a run that distilled
them on the same frozen model (configs/lm/seer_distill.yaml, configs/passkey/seer_distill.yaml); `moa` searches
its plan at each density (`effarch moa-search`, train/moa_search.py, with β in steps of 1/32 instead of 1/8 so
that spans reach the lowest densities); `routing` fits its k-means centroids by
`--routing-batches` training-mode passes of the frozen model over training batches (the EMA update the trainer
would make, with decay `--routing-decay`; no parameter changes).

Quality (the y axis): passkey exact match through the decode path (the prompt prefilled up to the answer, then one
teacher-forced decode step per answer digit), which is causal for every pattern; the parallel form's number is kept
beside it. The parallel form of mean_topk, seer and hip picks a query block's key blocks from all of the block's
queries, so a query's selection also depends on the block's later tokens (for passkey, the answer digits fed in
after it): SeerAttention's prefill rule, which leaks. HyperAttention decodes exactly, so its number is its parallel
form. Perplexity is the parallel form over the whole held-out split; for mean_topk, seer and hip, both paths are
also measured over the first `--decode-windows` windows, which sizes that leak.

Density (the x axis) is the fraction of the causal (query, key) token pairs a query reads, averaged over heads and
queries of a window of T = data.seq_len tokens, counted from each pattern's rule:
- mean_topk, seer, hip: every query block reads min(k, i + 1) key blocks (its diagonal block included, SeerAttention's
  top-k with the diagonal kept); blocks are `--block` tokens.
- sink_window: query t reads min(t + 1, n_sink + window) keys (`n_sink` = one block), the window chosen so the density
  is the nearest to the top-k level's.
- moa: query t of KV head h reads min(t + 1, S_h(T)) keys (layers/sparse_patterns.py moa_spans), from the searched
  plan; the search's budget is D = 1 − sqrt(1 − d), the KV fraction whose causal-pair density is d.
- routing: query t reads at most min(t + 1, block) keys (the newest `block` of its cluster, or the causal window of
  `block` on the `--routing-local-heads` local heads): an upper bound, reached when its cluster holds that many earlier
  keys.
- hyper: its recursive causal split (layers/sparse_hyper.py) counted exactly: a half of n ≤ hyper_min_seq_len tokens
  reads its causal triangle; the off-diagonal quarter of a larger level reads, per query, its sortLSH block of keys
  plus the sampled columns (exact and dense while the half is below hyper_min_seq_len).

Run:   .venv/bin/python benchmarks/sparsity_sweep.py --base RUN --seer SEER_RUN --out DIR [--levels 2 3 4 6]
       [--patterns dense sink_window moa mean_topk seer hip routing hyper] [--max-examples N] [--trials N]
Writes DIR/sparsity_sweep.json and DIR/sparsity_sweep.png (quality against density, one line per pattern).
"""

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from _common import LoadGate, platform_info
from flax import nnx

from effarch.arches.convert_sparse_attention import convert_to_sparse_attention
from effarch.arches.lm import DecoderLM
from effarch.layers import sparse_patterns
from effarch.layers.moa_plan import read_plan
from effarch.train.config import config_from_dict, to_dict
from effarch.train.convert import load_run_params
from effarch.train.evals import parse_options
from effarch.train.evals import passkey as passkey_eval
from effarch.train.evals import perplexity as perplexity_eval
from effarch.train.evals.common import decoded_outputs, exact_match, labelled_outputs
from effarch.train.moa_search import SearchError, search

PATTERNS = ("dense", "sink_window", "moa", "mean_topk", "seer", "hip", "routing", "hyper")


# ---- density: the fraction of causal (query, key) pairs read, per pattern (module docstring) -------------------

def causal_pairs(T: int) -> int:
    return T * (T + 1) // 2


def topk_density(T: int, block: int, k: int) -> float:
    """Blocks of `block` tokens (T a multiple): query block i reads its diagonal block and min(k, i + 1) - 1 earlier
    whole blocks."""
    nb = T // block
    earlier = sum(min(k, i + 1) - 1 for i in range(nb))
    return (nb * block * (block + 1) // 2 + earlier * block * block) / causal_pairs(T)


def span_density(T: int, spans) -> float:
    """Query t reads min(t + 1, S) keys, averaged over the spans S (one per head)."""
    t = np.arange(T)
    return float(np.mean([np.minimum(t + 1, s).sum() for s in np.atleast_1d(spans)]) / causal_pairs(T))


def hyper_density(T: int, block: int, samples: int, min_len: int) -> float:
    def causal(n: int) -> float:  # pairs read by the causal recursion over n tokens
        if n <= min_len:
            return n * (n + 1) / 2
        h = math.ceil(n / 2)
        rest = n - h
        if rest < min_len:  # the off-diagonal step is exact attention (module docstring of sparse_hyper.py)
            cross = rest * h
        else:  # per query: its sortLSH block of keys plus the sampled columns (some fall in its own block)
            cross = rest * min(h, block + samples)
        return causal(h) + causal(rest) + cross

    return causal(T) / causal_pairs(T)


def window_for(T: int, n_sink: int, target: float) -> int:
    """The window whose sink + window density is the nearest to `target`."""
    best = min(range(1, T + 1), key=lambda w: abs(span_density(T, n_sink + w) - target))
    return best


# ---- conversion and evaluation ----------------------------------------------------------------------------------

def model_from(cfg, params) -> DecoderLM:
    model = DecoderLM(cfg.model, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    model.eval()
    return model


def converted(cfg, params, **options):
    model_cfg, new_params = convert_to_sparse_attention(cfg.model, params, **options)
    new_cfg = config_from_dict({**to_dict(cfg), "model": to_dict(model_cfg)})
    return new_cfg, new_params


# Patterns whose parallel form picks a query block's keys from all of the block's queries (pooled), so a query's
# selection also depends on the block's later tokens: their decode path (causal) is the honest number.
POOLED = ("mean_topk", "seer", "hip")


def evaluate(cfg, model, args, pattern: str) -> dict:
    """{"quality": the plotted number, ...}: passkey exact match through the decode path (prefill up to the answer,
    then teacher-forced decode steps: causal for every pattern; hyper's parallel form, its approximation, since it
    decodes exactly), with the other path's next to it; perplexity of
    the parallel form over the whole held-out split, and for the POOLED patterns also both paths over its first
    `--decode-windows` windows (the parallel form's leak through the block-pooled selection)."""
    from effarch.train.data import passkey as passkey_data

    if cfg.data.task == "passkey":
        T = cfg.data.seq_len
        depths = np.repeat(np.asarray(passkey_eval.DEPTHS), args.trials)
        x, y, _ = passkey_data.passkey_batch(np.random.default_rng(args.seed), len(depths), T, 0, depths=depths)
        out = {}
        for path, fn in (("decode", decoded_outputs), ("parallel", labelled_outputs)):
            hit = exact_match(fn(model, x, y, 16)[0], y)
            out[path] = {"accuracy": float(hit.mean()),
                         "by_depth": {str(d): float(hit[depths == d].mean()) for d in passkey_eval.DEPTHS}}
        # hyper decodes with exact attention (layers/sparse_hyper.py): its approximation is the parallel form
        acc = out["parallel" if pattern == "hyper" else "decode"]["accuracy"]
        return {"quality": acc, "stderr": math.sqrt(acc * (1 - acc) / len(depths)), "trials": len(depths), **out}
    argv = [] if args.max_examples is None else ["--max-examples", str(args.max_examples)]
    full = perplexity_eval.run(cfg, model, parse_options("perplexity", argv))
    out = {"quality": full["summary"]["perplexity"], "loss": full["summary"]["loss"],
           "tokens": full["summary"]["tokens"]}
    if pattern in POOLED and args.decode_windows:
        seg = perplexity_eval.heldout_segments(cfg)[0]
        x, y = seg.inputs[: args.decode_windows], seg.labels[: args.decode_windows]
        out["subset"] = {"windows": len(x),
                         **{path: float(np.exp(fn(model, x, y, 16)[1].mean()))
                            for path, fn in (("decode", decoded_outputs), ("parallel", labelled_outputs))}}
    return out


def calibrate_routing(cfg, model: DecoderLM, batches: int):
    """Training-mode passes over the first training batches: each writes the centroids' EMA (layers/sparse_routing.py),
    nothing else changes (no gradient step)."""
    from effarch.train.data import build_data

    stream = build_data(cfg.data, cfg.model.vocab_size, min(cfg.train.batch_size, 8))[0]
    model.train()
    step = nnx.jit(lambda m, x: m(x))
    for s in range(batches):
        step(model, np.asarray(stream.batch(s)[0]))
    model.eval()


def points(args, cfg, T: int) -> list[tuple[str, dict, float]]:
    """(pattern, conversion options, density) of every point of the sweep."""
    bs = args.block
    out = []
    for k in args.levels:
        d = topk_density(T, bs, k)
        for pattern in ("mean_topk", "seer", "hip"):
            if pattern in args.patterns:
                opts = {"block_size": bs, "top_k": k, **({"pattern": pattern} if pattern != "seer" else {})}
                out.append((pattern, opts, d))
        if "sink_window" in args.patterns:
            w = window_for(T, bs, d)
            out.append(("sink_window", {"pattern": "sink_window", "block_size": bs, "n_sink": bs, "window": w},
                        span_density(T, bs + w)))
        if "moa" in args.patterns:
            out.append(("moa", {"pattern": "moa", "block_size": bs, "_target": d}, d))
    if "routing" in args.patterns:
        for b in args.routing_blocks:
            out.append(("routing", {"pattern": "routing", "block_size": b, "routing_clusters": max(2, T // b),
                                    "routing_decay": args.routing_decay,
                                    "routing_local_heads": args.routing_local_heads},
                        span_density(T, b)))
    if "hyper" in args.patterns:
        for b in args.hyper_blocks:
            out.append(("hyper", {"pattern": "hyper", "block_size": b, "hyper_samples": args.hyper_samples,
                                  "hyper_min_seq_len": args.hyper_min_len},
                        hyper_density(T, b, args.hyper_samples, args.hyper_min_len)))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the dense attention run")
    parser.add_argument("--seer", default=None, help="its seer-distilled run (gates); without it, no seer points")
    parser.add_argument("--out", required=True, help="directory for sparsity_sweep.json / .png")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4, 6],
                        help="top-k levels (blocks per query block); the other patterns match their densities")
    parser.add_argument("--routing-blocks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--routing-batches", type=int, default=32)
    parser.add_argument("--routing-local-heads", type=int, default=0,
                        help="the last KV heads attend a causal window of the block instead (the paper's mix, §4.1)")
    parser.add_argument("--routing-decay", type=float, default=0.8)
    parser.add_argument("--hyper-blocks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--hyper-samples", type=int, default=16)
    parser.add_argument("--hyper-min-len", type=int, default=32)
    parser.add_argument("--moa-batches", type=int, default=8)
    parser.add_argument("--max-examples", type=int, default=None, help="perplexity: held-out rows evaluated")
    parser.add_argument("--trials", type=int, default=100, help="passkey: keys per depth")
    parser.add_argument("--seed", type=int, default=0, help="passkey: the keys' seed")
    parser.add_argument("--decode-windows", type=int, default=16,
                        help="perplexity: held-out windows also decoded token by token for mean_topk / seer / hip")
    parser.add_argument("--resume", action="store_true",
                        help="keep the points of an earlier (interrupted) DIR/sparsity_sweep.json and measure the rest")
    args = parser.parse_args(argv)
    if "seer" in args.patterns and args.seer is None:
        args.patterns = [p for p in args.patterns if p != "seer"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gate = LoadGate()

    cfg, params = load_run_params(args.base)
    seer_cfg, seer_params = load_run_params(args.seer) if args.seer else (None, None)
    if args.seer and (b := seer_cfg.model.sparse_attention.block_size) != args.block:
        raise SystemExit(f"--seer {args.seer}: its gates score blocks of {b} tokens; run the sweep with --block {b}")
    T = cfg.data.seq_len
    task = cfg.data.task
    rows, skipped = [], []
    earlier = out_dir / "sparsity_sweep.json"
    if args.resume and earlier.exists():
        rows = json.loads(earlier.read_text())["points"]
    # a POOLED pattern's perplexity point counts as measured once its decode check is there too
    done = {(r["pattern"], json.dumps(r["options"], sort_keys=True)) for r in rows
            if not (task != "passkey" and r["pattern"] in POOLED and args.decode_windows and "subset" not in r)}
    rows = [r for r in rows if (r["pattern"], json.dumps(r["options"], sort_keys=True)) in done]

    def measured(pattern, opts) -> bool:
        return (pattern, json.dumps({k: v for k, v in opts.items() if k[0] != "_"}, sort_keys=True)) in done

    def save(partial: bool) -> dict:  # after every point, so an interrupted sweep keeps what it measured
        result = {"benchmark": "sparsity_sweep", "base": str(args.base), "seer": args.seer, "task": task,
                  "seq_len": T, "block": args.block, "quality": "accuracy" if task == "passkey" else "perplexity",
                  "points": rows, "skipped": skipped, "partial": partial, "platform": platform_info()}
        gate.stamp(result)  # the load average before and after; "loaded" above LoadGate.LIMIT
        (out_dir / "sparsity_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    def record(pattern, opts, density, result, wall):
        row = {"pattern": pattern, "density": density, "options": {k: v for k, v in opts.items() if k[0] != "_"},
               **result, "wall_s": wall}
        if "_target" in opts:  # moa: the density its plan search aimed at
            row["target"] = opts["_target"]
        rows.append(row)
        print(f"{pattern:12s} density {density:.3f}  {'perplexity' if task != 'passkey' else 'accuracy'} "
              f"{result['quality']:.4f}  ({wall:.0f} s)", flush=True)

    if "dense" in args.patterns and not measured("dense", {}):
        t = time.perf_counter()
        record("dense", {}, 1.0, evaluate(cfg, model_from(cfg, params), args, "dense"), time.perf_counter() - t)
    for pattern, opts, density in points(args, cfg, T):
        if measured(pattern, opts) or (pattern == "moa" and any(r["pattern"] == "moa" and abs(
                r.get("target", -1) - opts["_target"]) < 1e-9 for r in rows)):
            continue
        t = time.perf_counter()
        opts = dict(opts)
        src = seer_params if pattern == "seer" else params
        if pattern == "seer":  # the distilled run is already sparse_attention: its gates at the same paths
            new_cfg = dataclasses.replace(seer_cfg, model=dataclasses.replace(
                seer_cfg.model, sparse_attention=dataclasses.replace(
                    seer_cfg.model.sparse_attention, distill=False, top_k=opts["top_k"], density=None)))
            model = model_from(new_cfg, src)
        else:
            if pattern == "moa":
                target = opts.pop("_target")
                budget = 1 - math.sqrt(1 - target)
                plan_path = out_dir / f"moa_plan_d{target:.3f}.json"
                try:
                    search(args.base, plan_path, density=budget, calibration_batches=args.moa_batches, block=args.block,
                           betas=[j / 32 for j in range(33)])  # MoA's grid in steps of 1/32: spans down to T / 32
                except SearchError as e:  # below the sparsest candidate: no point, the reason kept
                    skipped.append({"pattern": "moa", "density": target, "why": str(e)})
                    print(f"moa          density {target:.3f}  skipped: {e}", flush=True)
                    continue
                plan = read_plan(plan_path)
                spans = [sparse_patterns.moa_spans(e["alpha"], e["beta"], T, 4)[0] for e in plan["layers"] if e]
                density = float(np.mean([span_density(T, s) for s in spans]))
                opts["plan"] = str(plan_path)
                opts["_target"] = target
            new_cfg, new_params = converted(cfg, src, **{k: v for k, v in opts.items() if k[0] != "_"})
            model = model_from(new_cfg, new_params)
            if pattern == "routing":
                calibrate_routing(new_cfg, model, args.routing_batches)
        record(pattern, opts, density, evaluate(new_cfg, model, args, pattern), time.perf_counter() - t)

        save(partial=True)

    result = save(partial=False)
    plot(result, out_dir / "sparsity_sweep.png")
    print(f"wrote {out_dir / 'sparsity_sweep.json'} and sparsity_sweep.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by = {}
    for row in result["points"]:  # routing with local heads is its own line (the paper's mix, §4.1)
        local = row["options"].get("routing_local_heads")
        by.setdefault(row["pattern"] + (f" + {local} local heads" if local else ""), []).append(row)
    perplexity = result["quality"] == "perplexity"
    dense = [r["quality"] for r in result["points"] if r["pattern"] == "dense"]
    top = 1.3 * dense[0] if perplexity and dense else None  # far worse lines are named, not drawn to scale
    for pattern, rows in by.items():
        rows = sorted(rows, key=lambda r: r["density"])
        x = [r["density"] for r in rows]
        y = [r["quality"] for r in rows]
        if pattern == "dense":  # a line across: the ceiling
            ax.axhline(y[0], color="black", linestyle="--", linewidth=1, label="dense")
            continue
        label = pattern + (" (≤)" if pattern.startswith("routing") else "")
        if top is not None and min(y) > top:
            label += f": {min(y):.1f}-{max(y):.1f}, above the axis"
            y = [top] * len(y)
        ax.plot(x, y, marker="o", label=label)
    if top is not None:
        ax.set_ylim(top=top * 1.01)
    ax.set_xlabel("density (fraction of causal query-key pairs read)")
    ax.set_ylabel("passkey exact match" if result["quality"] == "accuracy" else "validation perplexity")
    ax.set_title(f"{result['task']} T={result['seq_len']}, blocks of {result['block']}: one frozen dense model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
