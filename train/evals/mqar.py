"""MQAR accuracy per test segment, by default Zoology's test protocol: (64, 4) ... (1024, 256), 1000 examples each.

Data: `train/data/mqar.py::make_mixture` with the run's vocabulary, `power_a` and `random_non_queries`, from seed
`data.seed + 1000` (segment i from seed + 1000 + i), the trainer's test stream: for a run trained with
`data.mqar.mixture: zoology_standard` the default segments are exactly its test sets. Accuracy is over the labelled
(query) positions of each segment, as in Zoology; chance is 2 / vocab_size (values are uniform over the upper half of
the vocabulary). Each segment also reports the model's decode-state bytes per sequence at its length
(`DecoderLM.state_size`), the x axis of Zoology's accuracy-vs-state figure.
"""

import argparse
import re

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config
from effarch.train.data import mqar
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.evals.common import EvalError, labelled_outputs, positive_int, state_bytes

NAME = "mqar"


def segment(text: str) -> tuple[int, int]:
    """argparse type: 'SEQxPAIRS', e.g. '256x16'."""
    m = re.fullmatch(r"(\d+)[x:](\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected SEQ_LENxKV_PAIRS like 256x16, got {text!r}")
    return int(m[1]), int(m[2])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segments", type=segment, nargs="+", default=None,
                   help="test segments SEQxPAIRS (default Zoology's: 64x4 64x8 64x16 128x32 256x64 512x128 1024x256)")
    p.add_argument("--examples", type=positive_int, default=mqar.TEST_NUM_EXAMPLES, help="examples per segment")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows per forward pass (default train.eval_batch_size)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default data.seed + 1000, the trainer's)")


def segment_name(seq_len: int, kv_pairs: int) -> str:
    return f"N{seq_len}_D{kv_pairs}"


def check_segments(segments, vocab_size: int) -> None:
    for n, d in segments:
        if vocab_size <= n:
            raise EvalError(f"task mqar: segment {n}x{d} needs model.vocab_size > {n} (keys and values are distinct "
                            f"tokens), but this model has {vocab_size}; pass --segments that fit")
        if n % 2 or 4 * d > n:
            raise EvalError(f"task mqar: segment {n}x{d} must have an even length and 4 * kv_pairs <= length")


def evaluate(model: DecoderLM, segments, *, examples: int, seed: int, batch_size: int, power_a: float = 0.01,
             random_non_queries: bool = True) -> dict:
    """{"summary": {"accuracy": mean over segments, "N{n}_D{d}": accuracy, ...}, "results": {segment: {accuracy,
    loss, state_bytes, examples, queries}}, "chance": 2 / V}."""
    cfg = model.cfg
    check_segments(segments, cfg.vocab_size)
    data = mqar.make_mixture([(n, d, examples) for n, d in segments], cfg.vocab_size, seed, power_a=power_a,
                             random_non_queries=random_non_queries)
    results = {}
    for (n, d), (x, y) in zip(segments, data, strict=True):
        pred, ce = labelled_outputs(model, x, y, batch_size)
        target = y[y != IGNORE_LABEL]
        results[segment_name(n, d)] = {"seq_len": n, "kv_pairs": d, "accuracy": float((pred == target).mean()),
                                       "loss": float(ce.mean()), "state_bytes": state_bytes(cfg, n),
                                       "examples": examples, "queries": len(target)}
    accs = {name: r["accuracy"] for name, r in results.items()}
    summary = {"accuracy": sum(accs.values()) / len(accs), **accs}
    return {"summary": summary, "results": results, "chance": 2 / cfg.vocab_size}


def run(cfg: Config, model: DecoderLM, args: argparse.Namespace, log=None) -> dict:
    segments = [tuple(s) for s in (args.segments or mqar.TEST_SEGMENTS)]
    seed = cfg.data.seed + 1000 if args.seed is None else args.seed
    batch = args.batch_size or cfg.train.eval_batch_size
    out = evaluate(model, segments, examples=args.examples, seed=seed, batch_size=batch, power_a=cfg.data.mqar.power_a,
                   random_non_queries=cfg.data.mqar.random_non_queries)
    out["options"] = {"segments": [list(s) for s in segments], "examples": args.examples, "seed": seed,
                      "batch_size": batch}
    return out


def table(result: dict) -> str:
    lines = ["| segment (seq x kv pairs) | accuracy | loss | state bytes |", "|---|---|---|---|"]
    for r in result["results"].values():
        lines.append(f"| {r['seq_len']} x {r['kv_pairs']} | {r['accuracy']:.4f} | {r['loss']:.4f} | "
                     f"{r['state_bytes']:,} |")
    lines.append(f"| mean | {result['summary']['accuracy']:.4f} | | |")
    return "\n".join(lines)
