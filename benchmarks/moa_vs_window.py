"""MoA's searched per-head spans vs a uniform window of the same density, on held-out perplexity (issue #21's moa
evidence).

For a trained dense softmax-attention run: `effarch moa-search` at `--density` (train/moa_search.py), then four
conversions of the same weights (`effarch convert`, train/convert.py), each evaluated by `effarch eval RUN
perplexity` on the run's held-out data at its training length N:
- "dense": the run itself (`--to merged`: an unchanged copy, so nothing is written into the source run);
- "moa": `pattern=moa plan=...` (per-KV-head spans α + β·N, the plan's n_sink sinks each);
- "sink_window": the uniform rule of the same KV density: n_sink sinks + a window of density·N − n_sink keys;
- "window": density·N keys of window, no sinks.
Every sparse variant lets a query see at most density·N keys on average over the heads (the plan's mean S(N)/N is
at most the budget).

Run:      .venv/bin/python benchmarks/moa_vs_window.py --run-dir RUN --work-dir DIR [--density 0.25] [--block 16]
              [--calibration-batches 8] [--n-sink 4] [--max-examples N] [--out FILE]
Measured (effarch cb57378, jax 0.12.1, 2 shared CPU cores, load 7-10; benchmarks/README.md has the table): LM-base
(configs/lm/attention_512.yaml, the base run of the LongLoRA evidence: 4 layers of 4 MHA heads, d_model 128, byte-level
Python stdlib text, T = N = 512, 300 steps, 2.610 bits/byte held out), density 0.25 (128 keys per query; 16 heads), 8
calibration batches of 8 rows, all 83,258 held-out tokens. Perplexity dense 6.1042; sink_window (4 sinks + 124) 6.1264;
window (128) 6.1267; moa 6.1168 (--block 16), 6.1133 (--block 64), 6.1173 (--block 16, fixed spans α ∈ {16, 32, ...,
512}, β = 0): the searched plan beats the uniform window of the same density every time, closing 43% / 59% / 41% of its
gap to dense. The plans give layer 0 the widest spans (192-256 keys) and the later layers 48-128 but a head or two of
192-224. Each run 3.5 min.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from _common import emit

from effarch.train.convert import convert_run
from effarch.train.evals import run_eval
from effarch.train.moa_search import search


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a trained dense attention run")
    ap.add_argument("--work-dir", required=True, help="new directory for the plan and the converted runs")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--block", type=int, default=16, help="moa-search's influence pooling block")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="calibration rows per batch (moa-search's default)")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--alphas", type=float, nargs="+", default=None, help="moa-search's candidate alphas")
    ap.add_argument("--betas", type=float, nargs="+", default=None, help="moa-search's candidate betas")
    ap.add_argument("--max-examples", type=int, default=None, help="held-out rows evaluated (default all)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=False)
    found = search(args.run_dir, work / "plan.json", density=args.density, block=args.block,
                   calibration_batches=args.calibration_batches, batch_size=args.batch_size, n_sink=args.n_sink,
                   alphas=args.alphas, betas=args.betas)
    plan = found.plan
    n = plan["lengths"][-1]
    keys = int(round(args.density * n))  # keys per query of the uniform rules
    sink = min(args.n_sink, keys - 1)
    conversions = {
        "dense": ("merged", []),
        "moa": ("sparse_attention", ["pattern=moa", f"plan={found.plan_path}"]),
        "sink_window": ("sparse_attention", ["pattern=sink_window", f"n_sink={sink}", f"window={keys - sink}"]),
        "window": ("sparse_attention", ["pattern=sink_window", "n_sink=0", f"window={keys}"]),
    }
    eval_argv = [] if args.max_examples is None else ["--max-examples", str(args.max_examples)]
    results = {}
    for name, (to, options) in conversions.items():
        out = convert_run(args.run_dir, work / name, to, options)
        summary = run_eval(out, "perplexity", eval_argv, log=None)["summary"]
        results[name] = {k: summary[k] for k in ("loss", "perplexity", "bits_per_token", "bits_per_byte", "tokens")
                         if k in summary}
    spans = {str(layer): sorted(zip(entry["alpha"], entry["beta"], strict=True))
             for layer, entry in enumerate(plan["layers"]) if entry}
    span_at_n = [int(np.clip(np.floor(a + b * n), 1, n)) for entry in plan["layers"] if entry
                 for a, b in zip(entry["alpha"], entry["beta"], strict=True)]
    report = {
        "config": {"run_dir": str(args.run_dir), "density": args.density, "N": n, "block": args.block,
                   "calibration_batches": args.calibration_batches, "n_sink": args.n_sink,
                   "uniform_keys_per_query": keys, "max_examples": args.max_examples},
        "plan": {"path": str(found.plan_path), "rules_per_layer": spans, "spans_at_N": span_at_n,
                 "density_at_N": plan["plan_density"], "plan_loss": plan["plan_loss"],
                 "best_uniform_rule": plan["best_uniform_rule"]},
        "results": results,
        "targets": {"moa_beats_sink_window": results["moa"]["loss"] < results["sink_window"]["loss"],
                    "moa_beats_window": results["moa"]["loss"] < results["window"]["loss"]},
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
