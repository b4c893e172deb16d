"""What every evaluation task shares: model outputs at the labelled positions, exact-match scoring, the result file.

A task's result is one JSON object written to RUN_DIR/eval/<task>.json:
`{"task", "run_dir", "checkpoint_step", "model", "trained_task", "options", "summary", "results", "wall_s", "png"}`
(+ "warning" when the run was trained on another task), where `summary` is a flat {name: number} mapping (what
`effarch report` tabulates and a sweep selects on) and `results` the task's full detail.
"""

import argparse
import functools
import json
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Int

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.train.config import ConfigError
from effarch.train.data.labels import IGNORE_LABEL

LN2 = math.log(2.0)


class EvalError(ConfigError):
    """An evaluation cannot run as asked (a task that does not fit the model, a bad option). The message names it."""


def check_vocab(cfg: ModelConfig, needed: int, task: str) -> None:
    """Raises EvalError when the model's vocabulary has no ids for a task's tokens."""
    if cfg.vocab_size < needed:
        raise EvalError(f"task {task} needs model.vocab_size >= {needed}, but this model has {cfg.vocab_size}")


def labelled_outputs(
    model: DecoderLM, inputs: Int[np.ndarray, "N T"], labels: Int[np.ndarray, "N T"], batch_size: int,
    prefill: Int[np.ndarray, " N"] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy predictions and cross entropies (nats) at the labelled positions, in `np.nonzero(labels != -100)` order.

    Only the labelled positions get logits (as in training: the [tokens, vocab] logits of a 1024-token MQAR row at
    vocabulary 8192 would be 32 MiB, for 256 positions that count). Rows run in batches of `batch_size`; the last
    batch is padded with empty rows so that one compiled function serves every batch.

    `prefill` only matters when the model decodes through a KV policy (`decoded_outputs`).

    Returns:
      (predictions [K] int, cross entropies [K] float), K = the number of labelled positions.
    """
    if inputs.shape != labels.shape or inputs.ndim != 2:
        raise ValueError(f"inputs and labels must both be [N, T], got {inputs.shape} and {labels.shape}")
    if model.kv_policy is not None:
        return decoded_outputs(model, inputs, labels, batch_size, prefill)
    n, _ = inputs.shape
    batch_size = min(batch_size, n)
    width = int((labels != IGNORE_LABEL).sum(1).max()) * batch_size  # labelled positions per batch, at most
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, rows, cols, y):
        m = nnx.merge(graphdef, state)
        logits = m.logits(m.hidden(x)[rows, cols])
        return jnp.argmax(logits, -1), optax.softmax_cross_entropy_with_integer_labels(logits, y)

    preds, ces = [], []
    for start in range(0, n, batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(x)
        x = np.pad(x, ((0, pad), (0, 0)))
        rows, cols = np.nonzero(y != IGNORE_LABEL)
        k = len(rows)
        # Padding entries read position (0, 0) with target 0; they are dropped below.
        rows, cols = np.pad(rows, (0, width - k)), np.pad(cols, (0, width - k))
        targets = np.pad(y[y != IGNORE_LABEL], (0, width - k))
        p, c = run(state, jnp.asarray(x, jnp.int32), jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
                   jnp.asarray(targets, jnp.int32))
        preds.append(np.asarray(p)[:k])
        ces.append(np.asarray(c)[:k])
    return np.concatenate(preds), np.concatenate(ces)


class KVReads:
    """Running totals of what decode steps read through a KV policy: `decoded_outputs` adds to `KV_READS`, `run_eval`
    resets it before a task and reports it after (the eval runs in one process, one task at a time).

    tokens: Σ over decode steps and policy layers of the KV tokens one query head attended to (the layers' "kv_read");
    steps: decode steps × policy layers."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens, self.steps = 0.0, 0

    def per_step(self) -> float | None:
        """Mean KV tokens a query head read per decode step and policy layer (None: nothing was decoded)."""
        return self.tokens / self.steps if self.steps else None


KV_READS = KVReads()


def decoded_outputs(
    model: DecoderLM, inputs: Int[np.ndarray, "N T"], labels: Int[np.ndarray, "N T"], batch_size: int,
    prefill: Int[np.ndarray, " N"] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`labelled_outputs` through the model's decode path, which reads each layer's KV cache through its KV policy
    (`DecoderLM.set_kv_policy`): the first q tokens of a batch are prefilled (dense), then every later token up to the
    last labelled one is one decode step, teacher-forced (the true token is fed).

    q: by default p0 + 1, p0 the batch's first labelled position, so p0's output comes from the prefill (read
    densely) and every other labelled position is decoded. With `prefill` [N] (tokens to prefill per row, e.g. where a
    task's question starts: `question_starts`), q is the batch's smallest entry (at most p0 + 1): the tokens from q
    on, the question's included, are decoded through the policy, so no labelled output sees the dense prefill's
    reading of the question. Same order and padding as labelled_outputs."""
    n, _ = inputs.shape
    batch_size = min(batch_size, n)
    if prefill is not None and (np.shape(prefill) != (n,) or np.min(prefill) < 1):
        raise ValueError(f"prefill must be [N] = [{n}] token counts >= 1, got {np.asarray(prefill)}")
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(3,))
    def run(state, x, y, q):
        m = nnx.merge(graphdef, state)
        B, T = x.shape
        dec_state, logits = m.prefill(m.init_state(B, T), x[:, :q])
        first = logits[:, -1]  # position q - 1

        def step(dec_state, tok):
            dec_state, logits = m.decode_step(dec_state, tok)
            return dec_state, logits

        dec_state, rest = jax.lax.scan(step, dec_state, x[:, q:].T)  # [T - q, B, V]
        logits = jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)  # positions q - 1 .. T - 1
        targets = jnp.maximum(y[:, q - 1 :], 0)
        reads = [s["kv_read"] for s in dec_state if isinstance(s, dict) and "kv_read" in s]
        return (jnp.argmax(logits, -1), optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                sum(reads, jnp.zeros((), jnp.float32)), len(reads))

    preds, ces = [], []
    for start in range(0, n, batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(x)
        q_rows = None if prefill is None else np.asarray(prefill[start : start + batch_size])
        x = np.pad(x, ((0, pad), (0, 0)))
        y = np.pad(y, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL)
        rows, cols = np.nonzero(y != IGNORE_LABEL)
        if not len(rows):
            continue
        p0, last = int(cols.min()), int(cols.max())
        q = p0 + 1 if q_rows is None else min(int(q_rows.min()), p0 + 1)
        # The inputs past the last labelled position are never needed: cut them (fewer decode steps).
        p, c, reads, n_layers = run(state, jnp.asarray(x[:, : last + 1], jnp.int32),
                                    jnp.asarray(y[:, : last + 1], jnp.int32), q)
        KV_READS.tokens += float(reads)
        KV_READS.steps += (last + 1 - q) * int(n_layers)
        preds.append(np.asarray(p)[rows, cols - q + 1])
        ces.append(np.asarray(c)[rows, cols - q + 1])
    if not preds:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(preds), np.concatenate(ces)


def question_starts(inputs: Int[np.ndarray, "N T"], token: int) -> np.ndarray:
    """[N] index of the last `token` (a task's question marker) in each row: the tokens before the question, what
    `--kv-prefill context` prefills. ValueError when a row has no such token."""
    hit = np.asarray(inputs) == token
    if not hit.any(1).all():
        raise ValueError(f"a row has no question token {token}")
    return inputs.shape[1] - 1 - np.argmax(hit[:, ::-1], axis=1)


def exact_match(predictions: np.ndarray, labels: Int[np.ndarray, "N T"]) -> np.ndarray:
    """[N] bool: every labelled position of the row predicted right (`predictions` in labelled_outputs' order).

    With the true prefix fed in, this is exactly when greedy decoding reproduces the whole answer."""
    rows, cols = np.nonzero(labels != IGNORE_LABEL)
    wrong = np.zeros(len(labels), bool)
    np.logical_or.at(wrong, rows, predictions != labels[rows, cols])
    return ~wrong


def model_info(cfg: ModelConfig) -> dict:
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    return {"mixers": list(cfg.layer_mixers()), "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "vocab_size": cfg.vocab_size, "num_params": int(model.num_params())}


def state_bytes(cfg: ModelConfig, seq_len: int) -> int:
    """Decode-state bytes per sequence after seq_len tokens (`DecoderLM.state_size`), from an abstract model."""
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    return int(model.state_size(seq_len))


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def write_result(run_dir: str | Path, task: str, result: dict) -> Path:
    """Writes RUN_DIR/eval/<task>.json; `task` may carry a policy tag (`result_name`)."""
    out = eval_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def read_result(run_dir: str | Path, task: str) -> dict | None:
    path = eval_dir(run_dir) / f"{task}.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = round(time.perf_counter() - self.start, 2)


KV_PREFILL = ("context", "prompt")  # --kv-prefill's choices, the default first


def add_kv_policy_argument(p: argparse.ArgumentParser, question: bool = False) -> None:
    """`--kv-policy NAME [OPT=VALUE ...]`: decode through a KV policy (layers/kv_policies/) instead of the parallel
    forward; the result goes to RUN_DIR/eval/<task>.<policy tag>.json. A task whose prompt ends with a question
    (`question`: passkey, niah) also gets `--kv-prefill context|prompt`: what is prefilled densely."""
    p.add_argument("--kv-policy", nargs="+", metavar="NAME [OPT=VALUE]", default=None,
                   help="read each attention layer's KV cache at decode through this policy (window, quest, "
                        "retrieval, tokenselect, tidal, recycled, longheads, act, razor, duo) with option=value "
                        "settings, e.g. --kv-policy quest budget=256; a dense prefill, then decode steps through "
                        "the policy up to the last labelled token" + (" (--kv-prefill)" if question else ""))
    if question:
        p.add_argument("--kv-prefill", choices=KV_PREFILL, default=KV_PREFILL[0],
                       help="with --kv-policy: 'context' (default) prefills only the context before the question, "
                            "so the question and the answer are decoded through the policy; 'prompt' prefills "
                            "everything up to the first answer token (the question read with the full cache)")


def kv_policy_of(args: argparse.Namespace):
    """The KVPolicy that args.kv_policy names, or None; EvalError for an unknown policy or a bad option."""
    spec = getattr(args, "kv_policy", None)
    if not spec:
        return None
    from effarch.layers.kv_policies import PolicyError, make_policy

    try:
        return make_policy(spec[0], spec[1:])
    except PolicyError as e:
        raise EvalError(f"--kv-policy: {e}") from None


def result_name(task: str, policy=None, kv_prefill: str | None = None) -> str:
    """The result file's stem: the task, plus the policy's name and non-default options ("passkey.kv-quest-budget64")
    so that results under different policies sit side by side; a non-default `--kv-prefill` adds "prefillprompt"."""
    if policy is None:
        return task
    from effarch.layers.kv_policies.base import options

    changed = [f"{f.name}{_tag(getattr(policy, f.name))}" for f in options(policy)
               if getattr(policy, f.name) != f.default]
    if kv_prefill not in (None, KV_PREFILL[0]):
        changed.append(f"prefill{kv_prefill}")
    return ".".join([task, "-".join(["kv", policy.NAME, *changed])])


def _tag(value) -> str:
    """An option value as part of a file name: a path's separators (act's calibration=/a/b.json) become "_"."""
    return re.sub(r"[^A-Za-z0-9_.,:+=-]", "_", str(value).strip("/"))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1] (a depth)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v
