"""Passkey retrieval of a trained landmark model at 1x to 8x its training length, with and without block retrieval.

Task: train/data/passkey.py (the token-level analogue of the landmark paper's passkey test). For each
length and depth, `--trials` keys are hidden at that depth; a trial is correct when all 5 answer digits are the
argmax at their labelled positions with the true prefix fed in (teacher forcing). This equals greedy decoding of
the key: if every digit is right given right digits before it, greedy produces exactly these digits.

Paths:
- "full": the parallel forward over the whole input, every token at its true position, no retrieval (the same
  model as trained, run past its training length).
- "topk{k}": block-memory inference (arches/landmark_memory.py): chunks of `--chunk` tokens, completed blocks
  cached, top-k blocks per token and head, with the paper's positional remapping.

Output: JSON (accuracy per path, length and depth) and, with --png, a heatmap per path (matplotlib, optional extra
`plots`).

Run:   .venv/bin/python benchmarks/passkey_landmark.py --run-dir runs/passkey_landmark [--out FILE] [--png FILE]
"""

import argparse
import sys

import numpy as np
from _common import emit

from effarch.arches.lm import DecoderLM
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.evals import common, plots
from effarch.train.evals import passkey as passkey_eval
from effarch.train.generate import load_model

# The evaluation itself lives in the package (`effarch eval RUN_DIR passkey --topk 2 4`); this script keeps its
# report format and flags.
memory_logits = passkey_eval.memory_logits
with_topk = passkey_eval.with_topk


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Exact-match rate of the rows: every labelled position's argmax is its label."""
    rows, cols = np.nonzero(labels != IGNORE_LABEL)
    return float(common.exact_match(logits[rows, cols].argmax(-1), labels).mean())


def heatmap(report: dict, path: str) -> None:
    plots.depth_heatmap(report["results"], report["config"]["lengths"], report["config"]["depths"], path,
                        depth_label="depth")


def main(argv=None, model: DecoderLM | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="training run directory (its newest checkpoint)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=16, help="keys per (length, depth)")
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--chunk", type=int, default=128, help="tokens per memory_prefill call")
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention (no retrieval) path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--out")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    if model is None:
        if not args.run_dir:
            ap.error("--run-dir is required")
        model = load_model(args.run_dir)
    L = passkey_eval.landmark_block_len(model)
    with common.Timer() as t:
        out = passkey_eval.evaluate(model, args.lengths, args.depths, trials=args.trials, seed=args.seed,
                                    batch_size=args.batch, topk=args.topk, full=not args.no_full, chunk=args.chunk,
                                    log=lambda s: print(s, file=sys.stderr))
    report = {
        "config": {"run_dir": args.run_dir, "lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                   "topk": args.topk, "chunk": args.chunk, "block_len": L, "seed": args.seed,
                   "wall_s": t.seconds},
        "results": out["results"],
    }
    emit(report, args.out)  # before the optional plot, so a missing matplotlib loses no measurement
    if args.png:
        heatmap(report, args.png)
    return report


if __name__ == "__main__":
    main()
