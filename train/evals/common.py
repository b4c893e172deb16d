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
    model: DecoderLM, inputs: Int[np.ndarray, "N T"], labels: Int[np.ndarray, "N T"], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy predictions and cross entropies (nats) at the labelled positions, in `np.nonzero(labels != -100)` order.

    Only the labelled positions get logits (as in training: the [tokens, vocab] logits of a 1024-token MQAR row at
    vocabulary 8192 would be 32 MiB, for 256 positions that count). Rows run in batches of `batch_size`; the last
    batch is padded with empty rows so that one compiled function serves every batch.

    Returns:
      (predictions [K] int, cross entropies [K] float), K = the number of labelled positions.
    """
    if inputs.shape != labels.shape or inputs.ndim != 2:
        raise ValueError(f"inputs and labels must both be [N, T], got {inputs.shape} and {labels.shape}")
    if model.kv_policy is not None:
        return decoded_outputs(model, inputs, labels, batch_size)
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
    model: DecoderLM, inputs: Int[np.ndarray, "N T"], labels: Int[np.ndarray, "N T"], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`labelled_outputs` through the model's decode path, which reads each layer's KV cache through its KV policy
    (`DecoderLM.set_kv_policy`): the tokens up to the first labelled position p0 of a batch are prefilled (dense),
    then every later token up to the last labelled one is one decode step, teacher-forced (the true token is fed).
    Position p0's output comes from the prefill, so it is read densely; every other labelled position is decoded.
    Same order and padding as labelled_outputs."""
    n, _ = inputs.shape
    batch_size = min(batch_size, n)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(3,))
    def run(state, x, y, p0):
        m = nnx.merge(graphdef, state)
        B, T = x.shape
        dec_state, logits = m.prefill(m.init_state(B, T), x[:, : p0 + 1])
        first = logits[:, -1]

        def step(dec_state, tok):
            dec_state, logits = m.decode_step(dec_state, tok)
            return dec_state, logits

        dec_state, rest = jax.lax.scan(step, dec_state, x[:, p0 + 1 :].T)  # [T - p0 - 1, B, V]
        logits = jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)  # positions p0..T-1
        targets = jnp.maximum(y[:, p0:], 0)
        reads = [s["kv_read"] for s in dec_state if isinstance(s, dict) and "kv_read" in s]
        return (jnp.argmax(logits, -1), optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                sum(reads, jnp.zeros((), jnp.float32)), len(reads))

    preds, ces = [], []
    for start in range(0, n, batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(x)
        x = np.pad(x, ((0, pad), (0, 0)))
        y = np.pad(y, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL)
        rows, cols = np.nonzero(y != IGNORE_LABEL)
        if not len(rows):
            continue
        p0, last = int(cols.min()), int(cols.max())
        # The inputs past the last labelled position are never needed: cut them (fewer decode steps).
        p, c, reads, n_layers = run(state, jnp.asarray(x[:, : last + 1], jnp.int32),
                                    jnp.asarray(y[:, : last + 1], jnp.int32), p0)
        KV_READS.tokens += float(reads)
        KV_READS.steps += (last - p0) * int(n_layers)
        preds.append(np.asarray(p)[rows, cols - p0])
        ces.append(np.asarray(c)[rows, cols - p0])
    if not preds:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(preds), np.concatenate(ces)


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


def add_kv_policy_argument(p: argparse.ArgumentParser) -> None:
    """`--kv-policy NAME [OPT=VALUE ...]`: decode through a KV policy (layers/kv_policies/) instead of the parallel
    forward; the result goes to RUN_DIR/eval/<task>.<policy tag>.json."""
    p.add_argument("--kv-policy", nargs="+", metavar="NAME [OPT=VALUE]", default=None,
                   help="read each attention layer's KV cache at decode through this policy (window, quest, "
                        "retrieval, tokenselect, tidal, recycled, longheads, act, razor, duo) with option=value "
                        "settings, e.g. --kv-policy quest budget=256; the context is prefilled densely and the "
                        "labelled tokens are decoded one by one")


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


def result_name(task: str, policy=None) -> str:
    """The result file's stem: the task, plus the policy's name and non-default options ("passkey.kv-quest-budget64")
    so that results under different policies sit side by side."""
    if policy is None:
        return task
    from effarch.layers.kv_policies.base import options

    changed = [f"{f.name}{_tag(getattr(policy, f.name))}" for f in options(policy)
               if getattr(policy, f.name) != f.default]
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
