"""Single needle in a haystack (token-level S-NIAH, train/data/niah.py) of trained models at 1x to 4x their length.

Issue target: a small Titans MAC model trained at length 256 keeps >= 90% at 1024, where a sliding-window-attention
model of the same size falls to chance. This script measures it for any trained run directories (train them with
`effarch train configs/niah/titans_mac.yaml` and `configs/niah/sliding_window.yaml`).

For each length and depth, `--trials` needles are hidden at that depth; a trial is correct when all 7 value digits
are the argmax at their labelled positions with the true prefix fed in (teacher forcing), which equals greedy
decoding of the value (if every digit is right given right digits before it, greedy produces exactly these digits).
Chance is 10^-7 per trial (0.1 per digit, also reported).

Output: JSON (accuracy and per-digit accuracy per model, length and depth) and, with --png, a heatmap per model
(matplotlib, optional extra `plots`).

Run:   .venv/bin/python benchmarks/niah_titans.py --run mac=runs/niah_titans_mac --run swa=runs/niah_swa
           [--lengths 256 512 1024] [--out FILE] [--png FILE]
"""

import argparse
import sys
import time

from _common import LoadGate, depth_heatmap, emit

from effarch.arches.lm import DecoderLM
from effarch.train.evals.niah import evaluate as evaluate_niah
from effarch.train.generate import load_model


def evaluate(model: DecoderLM, lengths, depths, trials: int, seed: int, batch: int, log=None) -> dict:
    """{length: {"accuracy", "digit_accuracy", "by_depth": {depth: accuracy}}} for one model: the S-NIAH eval of
    `effarch eval RUN_DIR niah` (train/evals/niah.py)."""
    return evaluate_niah(model, lengths, depths, trials=trials, seed=seed, batch_size=batch, log=log)["results"]["full"]


def heatmap(report: dict, path: str) -> None:
    depth_heatmap(report, path, depth_label="needle depth")


def main(argv=None, models: dict[str, DecoderLM] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="a trained run directory (its newest checkpoint) under a name; repeat for each model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=20, help="needles per (length, depth)")
    ap.add_argument("--batch", type=int, default=25, help="sequences per forward pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    gate = LoadGate()
    runs = {}
    for item in args.run:
        name, sep, run_dir = item.partition("=")
        if not sep or not name or not run_dir:
            ap.error(f"--run takes NAME=RUN_DIR, got {item!r}")
        runs[name] = run_dir
    if models is None:
        if not runs:
            ap.error("give at least one --run NAME=RUN_DIR")
        models = {name: load_model(run_dir) for name, run_dir in runs.items()}
    start = time.perf_counter()
    results = {}
    for name, model in models.items():
        results[name] = evaluate(model, args.lengths, args.depths, args.trials, args.seed, args.batch,
                                 log=lambda s, name=name: print(f"{name} {s}", file=sys.stderr))
    report = {
        "config": {"runs": runs, "lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                   "seed": args.seed, "chance_digit_accuracy": 0.1, "wall_s": round(time.perf_counter() - start, 1)},
        "results": results,
    }
    emit(gate.stamp(report), args.out)  # before the optional plot, so a missing matplotlib loses no measurement
    if args.png:
        heatmap(report, args.png)
    return report


if __name__ == "__main__":
    main()
