"""Passkey retrieval by context length and depth (train/data/passkey.py, the landmark paper's test as tokens, §7.2).

For each length and depth, `trials` keys are hidden at that depth; a trial is correct when all 5 answer digits are
the argmax at their labelled positions with the true prefix fed in (teacher forcing), which is exactly when greedy
decoding returns the key. Chance is 10^-5 per trial (0.1 per digit, also reported).

Paths:
- "full": the parallel forward over the whole input, every token at its true position.
- "kv_{policy}{budget}" (`--kv-policy NAME [OPT=VALUE ...]`): the context before the question prefilled densely,
  then the question and the answer tokens decoded one by one, each attention layer reading its KV cache through the
  policy (layers/kv_policies/); `--kv-prefill prompt` prefills the question too (only the answer decoded).
- "topk{k}" (landmark models only, `--topk`): block-memory inference (arches/landmark_memory.py), chunks of
  `--chunk` tokens, completed blocks cached, top-k blocks per token and head, the paper's positional remapping.

A landmark model gets a landmark token after every `model.landmark.block_len` tokens (the layout it was trained on).
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effarch.arches.landmark_memory import init_memory, memory_prefill
from effarch.arches.lm import DecoderLM
from effarch.train.config import Config
from effarch.train.data import passkey
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
    question_starts,
    unit_float,
)

NAME = "passkey"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                   help="context lengths (default data.seq_len x 1, 2, 4)")
    p.add_argument("--depths", type=unit_float, nargs="+", default=list(DEPTHS))
    p.add_argument("--trials", type=positive_int, default=16, help="keys per (length, depth)")
    p.add_argument("--topk", type=positive_int, nargs="*", default=[],
                   help="landmark models: also evaluate top-k block retrieval for each k")
    p.add_argument("--chunk", type=positive_int, default=128, help="tokens per memory_prefill call (--topk)")
    p.add_argument("--no-full", action="store_true", help="skip the full forward path")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    add_kv_policy_argument(p, question=True)


def landmark_block_len(model: DecoderLM) -> int:
    """L when the model has landmark layers (a landmark token after every L tokens), else 0."""
    return model.cfg.landmark.block_len if "landmark" in model.cfg.layer_mixers() else 0


def memory_logits(model: DecoderLM, x: np.ndarray, chunk: int) -> np.ndarray:
    """Logits [N, T, V] of block-memory inference, `chunk` tokens per call."""
    B, T = x.shape
    L = landmark_block_len(model)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, s, t: memory_prefill(nnx.merge(graphdef, p), s, t))
    state = init_memory(model, B, max_blocks=T // (L + 1) + 1, max_chunk=chunk)
    out = []
    for start in range(0, T, chunk):
        state, logits = step(params, state, jnp.asarray(x[:, start : start + chunk]))
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def with_topk(model: DecoderLM, k: int) -> DecoderLM:
    """The same parameters with mem_topk = k in every landmark layer."""
    for block in model.blocks:
        if hasattr(block.mixer.config, "mem_topk"):
            block.mixer.config = dataclasses.replace(block.mixer.config, mem_topk=k)
    return model


def path_name(model: DecoderLM) -> str:
    """The labelled-outputs path's name: "full" (parallel forward), or "kv_<policy><budget>" when the model decodes
    through a KV policy (common.decoded_outputs)."""
    policy = model.kv_policy
    return "full" if policy is None else f"kv_{policy.NAME}{policy.budget}"


def kv_prefill_of(model: DecoderLM, x: np.ndarray, kv_prefill: str, query_token: int) -> np.ndarray | None:
    """The tokens to prefill per row for `decoded_outputs`: the context before the last `query_token` (the question)
    with kv_prefill "context", None (up to the first answer token) with "prompt" or without a KV policy."""
    if kv_prefill not in KV_PREFILL:
        raise EvalError(f"--kv-prefill must be one of {', '.join(KV_PREFILL)}, got {kv_prefill!r}")
    if model.kv_policy is None or kv_prefill == "prompt":
        return None
    return question_starts(x, query_token)


def predictions(model: DecoderLM, path: str, x: np.ndarray, y: np.ndarray, batch_size: int, chunk: int,
                kv_prefill: str = KV_PREFILL[0]) -> np.ndarray:
    """Argmax at the labelled positions (np.nonzero order) for one path."""
    if not path.startswith("topk"):
        return labelled_outputs(model, x, y, batch_size, kv_prefill_of(model, x, kv_prefill, passkey.QUERY))[0]
    logits = np.concatenate([memory_logits(with_topk(model, int(path[4:])), x[i : i + batch_size], chunk)
                             for i in range(0, len(x), batch_size)])
    rows, cols = np.nonzero(y != IGNORE_LABEL)
    return logits[rows, cols].argmax(-1)


def evaluate(model: DecoderLM, lengths, depths, *, trials: int, seed: int, batch_size: int, topk=(),
             full: bool = True, chunk: int = 128, kv_prefill: str = KV_PREFILL[0], log=None) -> dict:
    """{"summary": {"accuracy", "T{len}": accuracy, ...} of the first path, "results": {path: {str(len): {"accuracy",
    "digit_accuracy", "by_depth": {str(depth): accuracy}}}}}."""
    check_vocab(model.cfg, passkey.VOCAB_SIZE, NAME)
    L = landmark_block_len(model)
    if topk and not L:
        raise EvalError("task passkey: --topk needs a model with landmark layers")
    if topk and model.kv_policy is not None:
        raise EvalError("task passkey: --topk (landmark block memory) and --kv-policy are two inference paths; "
                        "give one")
    paths = ([path_name(model)] if full else []) + [f"topk{k}" for k in topk]
    if not paths:
        raise EvalError("task passkey: nothing to evaluate (--no-full without --topk)")
    rng = np.random.default_rng(seed)
    results = {p: {} for p in paths}
    for T in lengths:
        d = np.repeat(np.asarray(depths, float), trials)
        try:
            x, y, _ = passkey.passkey_batch(rng, len(d), T, L, depths=d)
        except ValueError as e:
            raise EvalError(f"task passkey: length {T}: {e}") from None
        for path in paths:
            pred = predictions(model, path, x, y, batch_size, chunk, kv_prefill)
            hit = exact_match(pred, y)
            results[path][str(T)] = {
                "accuracy": float(hit.mean()),
                "digit_accuracy": float((pred == y[y != IGNORE_LABEL]).mean()),
                "by_depth": {str(depth): float(hit[d == depth].mean()) for depth in depths},
            }
            if log is not None:
                log(f"passkey {path} T={T}: {results[path][str(T)]['accuracy']:.3f}")
    first = results[paths[0]]
    summary = {"accuracy": float(np.mean([r["accuracy"] for r in first.values()])),
               **{f"T{t}": r["accuracy"] for t, r in first.items()}}
    return {"summary": summary, "results": results, "chance_digit_accuracy": 0.1}


def default_lengths(cfg: Config) -> list[int]:
    return [cfg.data.seq_len * m for m in (1, 2, 4)]


def run(cfg: Config, model: DecoderLM, args: argparse.Namespace, log=None) -> dict:
    lengths = args.lengths or default_lengths(cfg)
    out = evaluate(model, lengths, args.depths, trials=args.trials, seed=args.seed, batch_size=args.batch_size,
                   topk=args.topk, full=not args.no_full, chunk=args.chunk, kv_prefill=args.kv_prefill, log=log)
    out["options"] = {"lengths": lengths, "depths": args.depths, "trials": args.trials, "topk": args.topk,
                      "chunk": args.chunk, "seed": args.seed, "batch_size": args.batch_size}
    if model.kv_policy is not None:
        out["options"]["kv_prefill"] = args.kv_prefill
    return out


def table(result: dict) -> str:
    return depth_table(result)


def depth_table(result: dict) -> str:
    """Markdown: one row per path and depth, one column per length, plus the overall accuracy per length."""
    lengths, depths = result["options"]["lengths"], result["options"]["depths"]
    lines = ["| path | depth | " + " | ".join(str(t) for t in lengths) + " |", "|---" * (len(lengths) + 2) + "|"]
    for path, by_len in result["results"].items():
        for d in depths:
            lines.append(f"| {path} | {d:.2f} | " + " | ".join(f"{by_len[str(t)]['by_depth'][str(d)]:.3f}"
                                                         for t in lengths) + " |")
        lines.append(f"| {path} | all | " + " | ".join(f"{by_len[str(t)]['accuracy']:.3f}" for t in lengths) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    plots.depth_heatmap(result["results"], result["options"]["lengths"], result["options"]["depths"], path,
                        depth_label="key depth")
