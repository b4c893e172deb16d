"""Loss, perplexity and bits per token (per byte for byte-level data) on the held-out split of a run's own data.

The held-out split is what the trainer evaluates on: the last `data.text.val_fraction` of the text for `data.task:
bytes`, the test segments (seed + 1000) for MQAR, the 256 evaluation examples of passkey / niah. Only labelled
positions count. Bits per byte = loss / ln 2 for the `bytes` task, whose tokens are bytes (landmark tokens are never
targets); for the `text` task, bits per token / the UTF-8 bytes per label of the held-out set
(`Segment.bytes_per_label`, as the trainer reports it); for token-level tasks only bits per token is reported.

`--lengths L1 L2 ...` (text and bytes runs): the held-out token stream is cut again into windows of exactly L tokens
for each L, independent of `data.seq_len`, and the model runs its parallel form at each L (length extrapolation).
The windows are made as the run's pipeline makes them: for `text`, the eval split's documents packed with the
separator (train/data/packing.py: cross-document labels masked, the last window padded; a run trained with
`data.text.bos` gets BOS at position 0 of every window of every L, as in training); for `bytes`, the held-out
byte stream (the trainer's validation windows joined back) in windows of L + 1 bytes at a stride of L, the remainder
dropped. For `text` every held-out target is a label in exactly one window at every L, so all lengths score the same
tokens. Per L: loss, perplexity, bits per token / byte, the number of windows, and the loss by position in the
window (buckets of `--bucket` tokens, default data.seq_len), where extrapolation past the training length shows.

`--kv-policy NAME [OPT=VALUE ...]`: every labelled token after a window's first one is predicted by a decode step
that reads each attention layer's KV cache through the policy (common.decoded_outputs; one step per token, so slower
than the parallel forward).
"""

import argparse
import dataclasses
import math

import numpy as np

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config
from effarch.train.data import Segment, build_data, mqar
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.data.packing import PackedWindows
from effarch.train.evals import plots
from effarch.train.evals.common import LN2, EvalError, add_kv_policy_argument, labelled_outputs, positive_int

NAME = "perplexity"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows per forward pass (default train.eval_batch_size; with --lengths, "
                        "train.eval_batch_size * data.seq_len // L rows at length L)")
    p.add_argument("--max-examples", type=positive_int, default=None,
                   help="evaluate at most this many held-out rows per set (with --lengths: windows per length)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                   help="text / bytes runs: windows of exactly these lengths (tokens) cut from the held-out text")
    p.add_argument("--bucket", type=positive_int, default=None,
                   help="with --lengths: tokens per position bucket of the loss by position (default data.seq_len)")
    add_kv_policy_argument(p)


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


# --- --lengths: the held-out text at any window length ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeldoutText:
    """The held-out token stream of a text / bytes run, to be cut into windows of any length.

    Attributes:
      tokens: [N] int32, the stream (text: documents each followed by the separator; bytes: the bytes).
      sep_id: the separator of a packed `text` stream, None for `bytes` (no documents).
      bytes_per_label: UTF-8 bytes per label (text), 1.0 for bytes.
      bos_id: the token a `text` run's windows start with (`data.text.bos`), None: none.
    """

    tokens: np.ndarray
    sep_id: int | None
    bytes_per_label: float
    bos_id: int | None = None

    def windows(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) [n, length] int32, as the run's pipeline makes windows of `length` (module docstring)."""
        if self.sep_id is not None:
            return PackedWindows(self.tokens, length, self.sep_id, self.bos_id).all()
        n = (len(self.tokens) - 1) // length
        w = self.tokens[np.arange(n)[:, None] * length + np.arange(length + 1)[None]]
        return w[:, :-1], w[:, 1:]


def heldout_text(cfg: Config) -> HeldoutText:
    """The held-out stream of a `text` or `bytes` run; EvalError for any other task, or landmark data."""
    d = cfg.data
    if d.task == "text":
        from effarch.train.data.text_stream import pack_split
        from effarch.train.data.tokenizers import text_tokenizer

        tokenizer = text_tokenizer(d.text)
        val, _ = pack_split(d, tokenizer, d.text.eval_split, d.text.max_eval_bytes)  # as build_text_data
        n_labels, n_bytes = val.labelled_bytes(tokenizer.token_bytes())
        return HeldoutText(val.tokens, val.sep_id, n_bytes / max(n_labels, 1), val.bos_id)
    if d.task == "bytes":
        if d.landmark.block_len:
            raise EvalError("perplexity --lengths: runs trained with landmark tokens (data.landmark.block_len) are "
                            "not supported; evaluate them with passkey --topk")
        (seg,) = heldout_segments(cfg)
        # The trainer's validation windows are consecutive at a stride of seq_len: joined back, the byte stream.
        stream = np.concatenate([seg.inputs.reshape(-1), seg.labels[-1, -1:]]).astype(np.int32)
        return HeldoutText(stream, None, 1.0)
    raise EvalError(f"perplexity --lengths needs a run trained on data.task text or bytes, not {d.task} (its "
                    "held-out examples have a fixed length)")


def evaluate_lengths(model: DecoderLM, held: HeldoutText, lengths, *, rows: dict[int, int], bucket: int,
                     max_examples: int | None = None, log=None) -> dict:
    """{"summary": {"loss_T{L}", "perplexity_T{L}", "bits_per_byte_T{L}" | "bits_per_token_T{L}"}, "results":
    {"T{L}": {loss, perplexity, bits_per_token, bits_per_byte, tokens, windows, "by_position": [{start, end, loss,
    bits_per_byte | bits_per_token, tokens}, ...]}}}. rows: forward-pass rows per length."""
    for length in lengths:
        if length < 2:
            raise EvalError(f"perplexity --lengths: each length must be >= 2 tokens, got {length}")
        if length > len(held.tokens) - 1:
            raise EvalError(f"perplexity --lengths: length {length} is longer than the held-out text "
                            f"({len(held.tokens) - 1} target tokens); give shorter lengths or more held-out text "
                            "(data.text.max_eval_bytes, data.text.val_fraction)")
    bits = "bits_per_byte"
    results, summary = {}, {}
    for length in lengths:
        x, y = held.windows(length)
        x, y = x[:max_examples], y[:max_examples]
        _, ce = labelled_outputs(model, x, y, rows[length])
        cols = np.nonzero(y != IGNORE_LABEL)[1]  # labelled_outputs' order: the position of each cross entropy
        r = {**_metrics(float(ce.sum()), len(ce), held.bytes_per_label * len(ce)), "windows": len(x)}
        r["by_position"] = []
        for start in range(0, length, bucket):
            sel = (cols >= start) & (cols < start + bucket)
            n = int(sel.sum())  # 0 in a bucket whose positions hold only pads and separators
            m = _metrics(float(ce[sel].sum()), n, held.bytes_per_label * n)
            r["by_position"].append({"start": start, "end": min(start + bucket, length),
                                     "loss": m["loss"] if n else None, bits: m[bits] if n else None, "tokens": n})
        results[f"T{length}"] = r
        summary.update({f"loss_T{length}": r["loss"], f"perplexity_T{length}": r["perplexity"],
                        f"{bits}_T{length}": r[bits]})
        if log is not None:
            log(f"perplexity T={length}: {len(x)} windows, loss {r['loss']:.4f}, {bits} {r[bits]:.4f}")
    return {"summary": summary, "results": results}


def run(cfg: Config, model: DecoderLM, args: argparse.Namespace, log=None) -> dict:
    if args.lengths is None:
        if args.bucket is not None:
            raise EvalError("perplexity: --bucket needs --lengths")
        batch = args.batch_size or cfg.train.eval_batch_size
        out = evaluate(model, heldout_segments(cfg), batch_size=batch, byte_level=cfg.data.task == "bytes",
                       max_examples=args.max_examples)
        out["options"] = {"batch_size": batch, "max_examples": args.max_examples, "data_task": cfg.data.task}
        return out
    lengths = list(dict.fromkeys(args.lengths))
    bad = [t for t in lengths if t < 2]
    if bad:
        raise EvalError(f"perplexity --lengths: each length must be >= 2 tokens, got {bad[0]}")
    held = heldout_text(cfg)
    seq_len = cfg.data.seq_len
    # The same tokens per forward pass as the trainer's evaluation at every length (dense attention's memory
    # grows with rows * L^2, so a fixed row count would not fit at long lengths).
    rows = {t: args.batch_size or max(1, cfg.train.eval_batch_size * seq_len // t) for t in lengths}
    bucket = args.bucket or seq_len
    out = evaluate_lengths(model, held, lengths, rows=rows, bucket=bucket, max_examples=args.max_examples, log=log)
    out["options"] = {"lengths": lengths, "bucket": bucket, "train_seq_len": seq_len,
                      "batch_size": {str(t): r for t, r in rows.items()}, "max_examples": args.max_examples,
                      "data_task": cfg.data.task}
    return out


def table(result: dict) -> str:
    if "lengths" in result["options"]:
        return lengths_table(result)
    cols = ["loss", "perplexity", "bits_per_token"] + (["bits_per_byte"] if "bits_per_byte" in result["summary"]
                                                       else [])
    lines = ["| set | " + " | ".join(cols) + " | tokens |", "|---" * (len(cols) + 2) + "|"]
    for name, m in [*result["results"].items(), ("all", result["summary"])]:
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + f" | {m['tokens']} |")
    return "\n".join(lines)


def lengths_table(result: dict) -> str:
    """Markdown: one row per length (windows, loss, perplexity, bits per byte, tokens), then the loss by position
    bucket (one row per length, one column per bucket)."""
    lengths, bucket = result["options"]["lengths"], result["options"]["bucket"]
    cols = ["loss", "perplexity", "bits_per_token", "bits_per_byte"]
    lines = ["| length | windows | " + " | ".join(cols) + " | tokens |", "|---" * (len(cols) + 3) + "|"]
    for t in lengths:
        r = result["results"][f"T{t}"]
        lines.append(f"| {t} | {r['windows']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + f" | {r['tokens']} |")
    n_buckets = max(len(result["results"][f"T{t}"]["by_position"]) for t in lengths)
    lines += ["", f"loss by position (buckets of {bucket} tokens):", "",
              "| length | " + " | ".join(f"{i * bucket}-" for i in range(n_buckets)) + " |",
              "|---" * (n_buckets + 1) + "|"]
    for t in lengths:
        cells = [f"{b['loss']:.4f}" if b["tokens"] else "—" for b in result["results"][f"T{t}"]["by_position"]]
        lines.append(f"| {t} | " + " | ".join(cells + [""] * (n_buckets - len(cells))) + " |")
    return "\n".join(lines)


def draws(result: dict) -> bool:
    """Whether `plot` has a figure for this result: only with --lengths."""
    return "lengths" in result["options"]


def plot(result: dict, path: str) -> None:
    """Bits per byte against length, and the bits per byte by position for each length (plots.length_curves)."""
    plots.length_curves(result["results"], result["options"]["lengths"], path,
                        train_len=result["options"]["train_seq_len"])
