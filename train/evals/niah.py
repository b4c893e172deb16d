"""Single needle in a haystack by context length and depth (train/data/niah.py, RULER's S-NIAH as tokens, §7.3).

For each length and depth, `trials` needles are hidden at that depth (`niah.niah_batch(rng, n, seq_len,
depths=...)`); a trial is correct when every labelled answer digit is the argmax with the true prefix fed in, which
equals greedy decoding of the value. The per-digit accuracy (chance 0.1) is reported too. With `--kv-policy` the
question and the answer are decoded through a KV policy after a dense prefill of the context (passkey.py's "kv_"
path; `--kv-prefill prompt` prefills the question too).
"""

import argparse

import numpy as np

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config
from effarch.train.data import niah
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.evals import plots
from effarch.train.evals.common import (
    KV_PREFILL,
    EvalError,
    add_kv_policy_argument,
    check_vocab,
    exact_match,
    labelled_outputs,
    positive_int,
    unit_float,
)
from effarch.train.evals.passkey import DEPTHS, default_lengths, depth_table, kv_prefill_of, path_name

NAME = "niah"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                   help="context lengths (default data.seq_len x 1, 2, 4)")
    p.add_argument("--depths", type=unit_float, nargs="+", default=list(DEPTHS))
    p.add_argument("--trials", type=positive_int, default=20, help="needles per (length, depth)")
    p.add_argument("--batch-size", type=positive_int, default=25, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    add_kv_policy_argument(p, question=True)


def evaluate(model: DecoderLM, lengths, depths, *, trials: int, seed: int, batch_size: int,
             kv_prefill: str = KV_PREFILL[0], log=None) -> dict:
    """{"summary": {"accuracy", "T{len}": accuracy, ...}, "results": {"full": {str(len): {"accuracy",
    "digit_accuracy", "by_depth": {str(depth): accuracy}}}}}."""
    check_vocab(model.cfg, niah.VOCAB_SIZE, NAME)
    rng = np.random.default_rng(seed)
    results = {}
    for T in lengths:
        d = np.repeat(np.asarray(depths, float), trials)
        try:
            x, y = niah.niah_batch(rng, len(d), T, depths=d)
        except ValueError as e:
            raise EvalError(f"task niah: length {T}: {e}") from None
        pred = labelled_outputs(model, x, y, batch_size, kv_prefill_of(model, x, kv_prefill, niah.QUERY))[0]
        hit = exact_match(pred, y)
        results[str(T)] = {"accuracy": float(hit.mean()),
                           "digit_accuracy": float((pred == y[y != IGNORE_LABEL]).mean()),
                           "by_depth": {str(depth): float(hit[d == depth].mean()) for depth in depths}}
        if log is not None:
            log(f"niah T={T}: exact {results[str(T)]['accuracy']:.3f}, per digit "
                f"{results[str(T)]['digit_accuracy']:.3f}")
    summary = {"accuracy": float(np.mean([r["accuracy"] for r in results.values()])),
               **{f"T{t}": r["accuracy"] for t, r in results.items()},
               "digit_accuracy": float(np.mean([r["digit_accuracy"] for r in results.values()]))}
    return {"summary": summary, "results": {path_name(model): results}, "chance_digit_accuracy": 0.1}


def run(cfg: Config, model: DecoderLM, args: argparse.Namespace, log=None) -> dict:
    lengths = args.lengths or default_lengths(cfg)
    out = evaluate(model, lengths, args.depths, trials=args.trials, seed=args.seed, batch_size=args.batch_size,
                   kv_prefill=args.kv_prefill, log=log)
    out["options"] = {"lengths": lengths, "depths": args.depths, "trials": args.trials, "seed": args.seed,
                      "batch_size": args.batch_size}
    if model.kv_policy is not None:
        out["options"]["kv_prefill"] = args.kv_prefill
    return out


def table(result: dict) -> str:
    return depth_table(result)


def plot(result: dict, path: str) -> None:
    plots.depth_heatmap(result["results"], result["options"]["lengths"], result["options"]["depths"], path,
                        depth_label="needle depth")
