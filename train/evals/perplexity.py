"""Loss, perplexity and bits per token (per byte for byte-level data) on the held-out split of a run's own data.

The held-out split is what the trainer evaluates on: the last `data.text.val_fraction` of the text for `data.task:
bytes`, the test segments (seed + 1000) for MQAR, the 256 evaluation examples of passkey / niah. Only labelled
positions count. Bits per byte = loss / ln 2 for the `bytes` task, whose tokens are bytes (landmark tokens are never
targets); for the `text` task, bits per token / the UTF-8 bytes per label of the held-out set
(`Segment.bytes_per_label`, as the trainer reports it); for token-level tasks only bits per token is reported.
"""

import argparse
import math

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config
from effarch.train.data import Segment, build_data, mqar
from effarch.train.evals.common import LN2, labelled_outputs, positive_int

NAME = "perplexity"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows per forward pass (default train.eval_batch_size)")
    p.add_argument("--max-examples", type=positive_int, default=None,
                   help="evaluate at most this many held-out rows per set")


def heldout_segments(cfg: Config) -> list[Segment]:
    """The run's evaluation sets, as `train.data.build_data` makes them."""
    d = cfg.data
    if d.task == "mqar":
        # build_data would also generate the (much larger) training mixture; the test segments alone, from the
        # same seeds, are the same arrays (tests/train/test_evals.py checks the loss against the trainer's).
        if d.mqar.mixture == "zoology_standard":
            tests = tuple((n, k, mqar.TEST_NUM_EXAMPLES) for n, k in mqar.TEST_SEGMENTS)
        else:
            tests = d.mqar.test_segments
        arrays = mqar.make_mixture(tests, cfg.model.vocab_size, d.seed + 1000, power_a=d.mqar.power_a,
                                   random_non_queries=d.mqar.random_non_queries)
        return [Segment(f"mqar_N{n}_D{k}", x, y) for (n, k, _), (x, y) in zip(tests, arrays, strict=True)]
    return build_data(d, cfg.model.vocab_size, cfg.train.batch_size)[1]


def evaluate(model: DecoderLM, segments: list[Segment], *, batch_size: int, byte_level: bool,
             max_examples: int | None = None) -> dict:
    """{"summary": {loss, perplexity, bits_per_token[, bits_per_byte], tokens}, "results": {set: same}}."""
    results, total_ce, total_n, total_bytes = {}, 0.0, 0, 0.0
    for seg in segments:
        x, y = seg.inputs[:max_examples], seg.labels[:max_examples]
        _, ce = labelled_outputs(model, x, y, batch_size)
        per_label = seg.bytes_per_label or (1.0 if byte_level else None)
        n_bytes = None if per_label is None else per_label * len(ce)
        results[seg.name] = _metrics(float(ce.sum()), len(ce), n_bytes)
        total_ce += float(ce.sum())
        total_n += len(ce)
        total_bytes = None if n_bytes is None or total_bytes is None else total_bytes + n_bytes
    return {"summary": _metrics(total_ce, total_n, total_bytes), "results": results}


def _metrics(ce_sum: float, n: int, n_bytes: float | None) -> dict:
    """n_bytes: the UTF-8 bytes the n labels stand for (None: not text)."""
    loss = ce_sum / max(n, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_token": loss / LN2, "tokens": n}
    if n_bytes:
        out["bits_per_byte"] = ce_sum / LN2 / n_bytes
    return out


def run(cfg: Config, model: DecoderLM, args: argparse.Namespace, log=None) -> dict:
    batch = args.batch_size or cfg.train.eval_batch_size
    out = evaluate(model, heldout_segments(cfg), batch_size=batch, byte_level=cfg.data.task == "bytes",
                   max_examples=args.max_examples)
    out["options"] = {"batch_size": batch, "max_examples": args.max_examples, "data_task": cfg.data.task}
    return out


def table(result: dict) -> str:
    cols = ["loss", "perplexity", "bits_per_token"] + (["bits_per_byte"] if "bits_per_byte" in result["summary"]
                                                       else [])
    lines = ["| set | " + " | ".join(cols) + " | tokens |", "|---" * (len(cols) + 2) + "|"]
    for name, m in [*result["results"].items(), ("all", result["summary"])]:
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + f" | {m['tokens']} |")
    return "\n".join(lines)
