"""The training loop: a jit-compiled, explicitly sharded train step, evaluation, metrics and checkpoints.

Read top to bottom: `Trainer` builds the mesh, the model's parameters (sharded by logical-axis rules), the optimizer
and the jitted step; `train_and_evaluate` opens the run (its directory's lock, checkpointer and metrics writer, each
closed on every way out), `_initial_state` restores or initialises, and `_train_loop` runs the steps. A run directory
holds everything needed to resume: config.yaml, run_info.json, metrics.jsonl, tb/ and checkpoints/. Starting a run in
a directory that already has checkpoints resumes from the newest complete one (params, optimizer state, step = data
position, RNG) when the config still means the same run (train/run_dir.py); `train.init_from` starts from another
run's parameters (train/finetune.py).

The loop keeps the devices busy: batches are made and put on the devices ahead by a thread (train/prefetch.py), and
a step's results are read back only at log steps and before evaluations and checkpoints, where the device-side
NaN/inf record carried through every step (train/health.py) is checked.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.arches.lm import DecoderLM
from effarch.layers.aux_loss import collect_aux_losses
from effarch.layers.trained_state import SAVED, TrainedBuffer
from effarch.train import param_tree, sharding
from effarch.train.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    SaveFailed,  # noqa: F401 - re-exported: main.py catches it from here
)
from effarch.train.checks import check_config
from effarch.train.config import Config, ConfigError
from effarch.train.data import Segment, build_data
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.finetune import init_from_checkpoint, write_report
from effarch.train.health import (
    TrainingDiverged,  # noqa: F401 - re-exported: main.py catches it from here
    init_health,
    raise_if_diverged,
    update_health,
)
from effarch.train.lora import build_model, lora_frozen_paths
from effarch.train.metrics import MetricsWriteFailed, MetricsWriter
from effarch.train.prefetch import Prefetcher
from effarch.train.run_dir import check_run_dir, prepare_run_dir, resolve_run_dir
from effarch.train.run_lock import RunLock

log = logging.getLogger("effarch")


def maybe_initialize_distributed() -> None:
    """Multi-host: call jax.distributed.initialize when the launcher set the coordinator variables.

    EFFARCH_COORDINATOR=host:port, EFFARCH_NUM_PROCESSES, EFFARCH_PROCESS_ID (CPU/GPU clusters); on TPU pods the
    no-argument form auto-detects (set EFFARCH_DISTRIBUTED=1).
    """
    if jax.distributed.is_initialized():
        return
    if "EFFARCH_COORDINATOR" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["EFFARCH_COORDINATOR"],
            num_processes=int(os.environ["EFFARCH_NUM_PROCESSES"]),
            process_id=int(os.environ["EFFARCH_PROCESS_ID"]),
        )
    elif os.environ.get("EFFARCH_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def decays(path: str, var: nnx.Variable) -> bool:
    """AdamW's weight decay applies to matrices (embeddings and projections) only: not to norm scales, biases,
    parameters that opt out with `weight_decay=False` metadata (the short convolutions' per-channel taps), or
    trained buffers (layers/trained_state.py)."""
    return var.ndim >= 2 and var.get_metadata().get("weight_decay", True) and not isinstance(var, TrainedBuffer)


def buffer_paths(abstract_params) -> set[str]:
    """Paths of the trained buffers (layers/trained_state.py) in the saved state: the optimizer leaves them alone
    (zero update, no moments) and the step writes the forward pass's new value into them."""
    flags = param_tree.flatten(param_tree.map_variables(lambda _, var: isinstance(var, TrainedBuffer),
                                                        abstract_params))
    return {path for path, is_buffer in flags.items() if is_buffer}


def frozen_paths(cfg: Config, abstract_params) -> set[str]:
    """Paths of the parameters that a `train.freeze` pattern matches (re.search), and with `train.lora` every base
    weight that `lora.train_also` does not name (train/lora.py)."""
    patterns = [re.compile(p) for p in cfg.train.freeze]
    matched = {path for path in param_tree.flatten(abstract_params) if any(p.search(path) for p in patterns)}
    return matched | lora_frozen_paths(cfg, abstract_params)


def make_optimizer(cfg: Config, abstract_params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + schedule and clipping; parameters matched by `train.freeze` get a zero update and no
    optimizer state (optax.multi_transform keeps no moments for them)."""
    o, steps = cfg.optim, cfg.train.steps
    if o.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, o.lr, warmup_steps=o.warmup_steps, decay_steps=max(steps, o.warmup_steps + 1),
            end_value=o.lr * o.min_lr_ratio)
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)), optax.constant_schedule(o.lr)],
            [o.warmup_steps])
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=param_tree.map_variables(decays, abstract_params))
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw
    frozen = frozen_paths(cfg, abstract_params) | buffer_paths(abstract_params)
    if frozen:
        labels = param_tree.map_variables(lambda path, _: "frozen" if path in frozen else "train", abstract_params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def _cast_floating(tree, dtype):
    """The floating parameters of `tree` (an nnx.State) in `dtype`; trained buffers keep their float32 (an EMA's
    small steps would round away in bfloat16)."""
    def cast(var):
        x = var[...]
        if isinstance(var, TrainedBuffer) or not jnp.issubdtype(x.dtype, jnp.floating):
            return var
        return var.replace(x.astype(dtype))

    return jax.tree.map(cast, tree, is_leaf=param_tree.is_variable)


def _with_buffers(params, buffers: dict):
    """params with each trained buffer's leaf replaced by buffers[path] (in its dtype)."""
    if not buffers:
        return params
    return param_tree.map_variables(
        lambda path, var: buffers[path].astype(var.dtype) if path in buffers else var[...], params)


def _clamped(params):
    """params with every parameter whose metadata has `bounds=(lo, hi)` clipped into them (DuoAttention's gates stay
    in [0, 1], as the official loop clamps them before every step)."""
    def clamp(path, var):
        bounds = var.get_metadata().get("bounds")
        return var[...] if bounds is None else jnp.clip(var[...], *bounds)

    return param_tree.map_variables(clamp, params)


def _gates_open(params):
    """params with every DuoAttention gate at 1: the full-attention model the gates are distilled against."""
    return param_tree.map_variables(
        lambda path, var: jnp.ones_like(var[...]) if path.endswith("duo_gate") else var[...], params)


def token_loss(logits, labels):
    """Summed cross entropy, correct count and count over positions with a label (labels == -100 are skipped)."""
    mask = labels != IGNORE_LABEL
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(ce * mask), jnp.sum(correct), jnp.sum(mask)


def labeled_hidden(hidden, labels, max_labels: int):
    """The hidden states and labels of the (at most `max_labels`) positions that have a label.

    Only these positions need logits. In MQAR that is 1 position in 16, and the [tokens, vocab] logits are most
    of the step's memory traffic, so the head runs on the gathered rows only. Same loss, same gradients.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    if max_labels >= flat_y.shape[0]:
        return flat_h, flat_y
    (idx,) = jnp.nonzero(flat_y != IGNORE_LABEL, size=max_labels, fill_value=0)
    valid = jnp.arange(max_labels) < jnp.sum(flat_y != IGNORE_LABEL)
    return flat_h[idx], jnp.where(valid, flat_y[idx], IGNORE_LABEL)


class Trainer:
    """Holds the compiled functions and the sharded state of one run."""

    def __init__(self, cfg: Config, devices=None, *, labels_per_example: int | None = None):
        """`labels_per_example`: the most labelled positions any example has (None: every position may be)."""
        self.cfg = cfg
        self.labels_per_example = labels_per_example
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        rules = cfg.sharding_rules
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
        # The saved state: parameters and trained buffers (layers/trained_state.py); the rest (AuxLoss scalars) is
        # rebuilt at init and closed over by the step.
        self.graphdef, abstract_params, abstract_rest = nnx.split(abstract, SAVED, ...)
        self.tx, self.schedule = make_optimizer(cfg, abstract_params)
        frozen = frozen_paths(cfg, abstract_params) | buffer_paths(abstract_params)
        # True where a parameter trains, False where it is frozen (or a trained buffer): a frozen gradient is zeroed
        # so that the logged grad norm is that of what trains (its update is zero either way).
        self._trainable = param_tree.map_variables(lambda path, _: path not in frozen, abstract_params)
        self.compute_dtype = jnp.dtype(cfg.train.compute_dtype)
        # Explicit shardings for every input and output of the compiled functions.
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = sharding.batch_sharding(self.mesh, rules)
        self.param_sharding = sharding.param_shardings(abstract_params, rules, self.mesh)
        self.opt_sharding = sharding.optimizer_shardings(self.tx, abstract_params, self.param_sharding, self.mesh)
        params_in = (self.param_sharding, self.opt_sharding)

        def init(seed):
            model = build_model(cfg, nnx.Rngs(seed))
            _, params, rest = nnx.split(model, SAVED, ...)
            return params, rest

        self._init = jax.jit(init, static_argnums=0, out_shardings=(self.param_sharding, self.replicated))
        self._opt_init = jax.jit(self.tx.init, in_shardings=(self.param_sharding,), out_shardings=self.opt_sharding)
        self._train_step = jax.jit(
            self._under_mesh(self._step),
            in_shardings=(*params_in, self.batch_sharding, self.batch_sharding),
            out_shardings=(*params_in, self.replicated),
            donate_argnums=(0, 1),
        )
        # The loop's step: the same update, plus the device-side NaN/inf record (train/health.py) carried through it.
        self._train_step_checked = jax.jit(
            self._under_mesh(self._checked_step),
            in_shardings=(*params_in, self.replicated, self.batch_sharding, self.batch_sharding),
            out_shardings=(*params_in, self.replicated, self.replicated),
            donate_argnums=(0, 1, 2),
        )
        self._eval_step = jax.jit(self._under_mesh(self._eval), in_shardings=(self.param_sharding, self.batch_sharding,
                                                            self.batch_sharding), out_shardings=self.replicated)

    def _under_mesh(self, fn):
        """`fn` traced with the run's mesh in context even when the caller set none (a compile of the step from
        another script): the Pallas kernels split themselves over it with shard_map and pick the kernels of its
        devices' platform (pallas_kernels/shard.py, pallas_kernels/dispatch.py)."""

        @functools.wraps(fn)
        def traced(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return fn(*args)

        return traced

    # --- state ------------------------------------------------------------------------------------------------
    def init_state(self, seed: int):
        params, self.rest = self._init(seed)
        opt_state = self._opt_init(params)
        rng = jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), self.replicated)
        return params, opt_state, rng

    def init_optimizer(self, params):
        return self._opt_init(params)

    def model(self, params) -> DecoderLM:
        return nnx.merge(self.graphdef, params, self.rest)

    # --- steps ------------------------------------------------------------------------------------------------
    def _forward(self, params, inputs, labels, *, training: bool = False, normed: bool = False):
        """(summed cross entropy, correct, label count, {name: auxiliary loss of a layer}, {path: trained buffer's
        new value}). `training`: the model in training mode (`model.train()`), where layers update their trained
        buffers (layers/trained_state.py). `normed`: also the final-norm hidden states of the labelled rows [N, D]
        and their labels [N] (objective duo)."""
        # copy=True: the forward pass writes the layers' AuxLoss variables, which must belong to this trace.
        model = nnx.merge(self.graphdef, _cast_floating(params, self.compute_dtype), self.rest, copy=True)
        if training:
            model.train()
        per_example = self.labels_per_example or labels.shape[1]
        h, y = labeled_hidden(model.hidden(inputs, constrain=self._split_rows), labels, per_example * labels.shape[0])
        logits = self._split_rows(model.logits(self._split_rows(h)))
        buffers = param_tree.flatten(nnx.state(model, TrainedBuffer))
        out = (*token_loss(logits, y), collect_aux_losses(model), buffers)
        return (*out, model.norm(h).astype(jnp.float32), y) if normed else out

    def _split_rows(self, x: jax.Array) -> jax.Array:
        """Activations (hidden states [B, T, D], the labelled rows [N, D], their logits [N, V]) split along their first
        axis over the batch axes, like the batch. Without it the compiler chose to keep them whole on every device
        under FSDP, where the weights are split over the same axis (DecoderLM.hidden)."""
        spec = P(self.batch_sharding.spec[0], *(None,) * (x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _forward_loss(self, params, inputs, labels):
        return self._forward(params, inputs, labels)[:3]

    def _duo_loss(self, params, inputs, labels):
        """objective duo (TrainConfig.objective): Σ over labelled rows of mean_d (h_full − h)² on the final-norm hidden
        states, plus λ·mean|α|·count, so that the division by the label count gives the official loss. h_full: the
        same parameters with every gate at 1, without gradient. The official code instead mixes each layer's
        streaming output with the full-attention copy's output of the same layer (the teacher's hidden states, not
        the gated model's); with one attention layer the two agree, and at α = 1 both are the full model."""
        ce_sum, correct, count, aux, buffers, h, y = self._forward(params, inputs, labels, training=True, normed=True)
        h_full = jax.lax.stop_gradient(self._forward(_gates_open(params), inputs, labels, normed=True)[5])
        distill = jnp.sum(jnp.mean((h_full - h) ** 2, axis=-1) * (y != IGNORE_LABEL))
        gates = [gate for path, gate in param_tree.flatten(params).items() if path.endswith("duo_gate")]
        l1 = jnp.mean(jnp.abs(jnp.concatenate(gates))).astype(jnp.float32) * count
        total = distill + self.cfg.train.duo_l1 * l1
        aux = {name: value.astype(jnp.float32) * count for name, value in aux.items()}  # logged only, as _loss's
        return total, (ce_sum, correct, count, {**aux, "duo_distill": distill, "duo_l1": l1}, buffers)

    def _loss(self, params, inputs, labels):
        if self.cfg.train.objective == "duo":
            return self._duo_loss(params, inputs, labels)
        ce_sum, correct, count, aux, buffers = self._forward(params, inputs, labels, training=True)
        # The aux losses are means; times the label count, the final division by the count adds β·Σ aux to the
        # mean loss (and gives a count-weighted mean over micro-batches under grad_accum_steps).
        aux = {name: value.astype(jnp.float32) * count for name, value in aux.items()}
        total = ce_sum + self.cfg.train.aux_loss_weight * sum(aux.values(), jnp.float32(0))
        return total, (ce_sum, correct, count, aux, buffers)

    def gradients(self, params, inputs, labels):
        """Mean-over-labels gradients and (mean loss, accuracy, {name: mean aux loss}), accumulated over
        train.grad_accum_steps. The gradients include β times the aux losses; the loss is cross entropy only."""
        return self._gradients(params, inputs, labels)[:4]

    def _gradients(self, params, inputs, labels):
        """`gradients`, and {path: trained buffer's new value} (the mean over the micro-batches' forward passes)."""
        accum = self.cfg.train.grad_accum_steps
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if accum == 1:
            (_, (ce_sum, correct, count, aux, buffers)), grads = grad_fn(params, inputs, labels)
        else:
            # Sum (not average) per micro-batch, divide once by the total label count: identical to one big batch.
            def micro(x):
                return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

            def body(carry, batch):
                (_, sums), grads = grad_fn(params, *batch)
                acc_grads, acc = carry
                return (jax.tree.map(jnp.add, acc_grads, grads), jax.tree.map(jnp.add, acc, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            shapes = jax.eval_shape(self._loss, params, inputs, labels)[1]
            aux0 = {name: jnp.float32(0) for name in shapes[3]}
            buffers0 = {path: jnp.zeros(s.shape, s.dtype) for path, s in shapes[4].items()}
            init = (zeros, (jnp.float32(0), jnp.int32(0), jnp.int32(0), aux0, buffers0))
            (grads, (ce_sum, correct, count, aux, buffers)), _ = jax.lax.scan(
                body, init, (micro(inputs), micro(labels)))
            buffers = {path: value / accum for path, value in buffers.items()}  # summed by the scan: the mean
        n = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: (g / n).astype(jnp.float32), grads)
        return grads, ce_sum / n, correct / n, {name: value / n for name, value in aux.items()}, buffers

    def _step(self, params, opt_state, inputs, labels):
        grads, loss, accuracy, aux, buffers = self._gradients(params, inputs, labels)
        grads = jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g), grads, self._trainable)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = _clamped(_with_buffers(optax.apply_updates(params, updates), buffers))
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
                   **{f"aux/{name}": value for name, value in aux.items()}}
        return params, opt_state, metrics

    def _checked_step(self, params, opt_state, health, inputs, labels):
        params, opt_state, metrics = self._step(params, opt_state, inputs, labels)
        return params, opt_state, update_health(health, metrics["loss"], metrics["grad_norm"]), metrics

    def _eval(self, params, inputs, labels):
        return self._forward_loss(params, inputs, labels)

    # --- host side --------------------------------------------------------------------------------------------
    def global_batch(self, local_inputs, local_labels):
        shape = (local_inputs.shape[0] * jax.process_count(), local_inputs.shape[1])
        def make(x):
            return jax.make_array_from_process_local_data(self.batch_sharding, x, shape)
        return make(local_inputs.astype(np.int32)), make(local_labels.astype(np.int32))

    def train_step(self, params, opt_state, inputs, labels):
        with jax.set_mesh(self.mesh):
            return self._train_step(params, opt_state, inputs, labels)

    def train_step_checked(self, params, opt_state, health, inputs, labels):
        """train_step that also carries the NaN/inf record: (params, opt_state, health, metrics), all on device."""
        with jax.set_mesh(self.mesh):
            return self._train_step_checked(params, opt_state, health, inputs, labels)

    def init_health(self, step: int):
        return jax.device_put(init_health(step), self.replicated)

    def evaluate(self, params, segment: Segment) -> dict:
        """Token accuracy and mean loss over a whole evaluation set (padded to full batches)."""
        bs = self.cfg.train.eval_batch_size
        per_proc = bs // jax.process_count()
        ce = correct = count = 0
        for start in range(0, len(segment.inputs), bs):
            x = segment.inputs[start : start + bs]
            y = segment.labels[start : start + bs]
            pad = bs - len(x)
            x = np.pad(x, ((0, pad), (0, 0)))
            y = np.pad(y, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL)
            rows = slice(jax.process_index() * per_proc, (jax.process_index() + 1) * per_proc)
            with jax.set_mesh(self.mesh):
                out = self._eval_step(params, *self.global_batch(x[rows], y[rows]))
            ce, correct, count = (a + float(b) for a, b in zip((ce, correct, count), out))
        loss = ce / max(count, 1)
        out = {"accuracy": correct / max(count, 1), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if segment.bytes_per_label:  # text task: nats per label -> bits per UTF-8 byte of the labels' text
            out["bits_per_byte"] = loss / math.log(2) / segment.bytes_per_label
        return out


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class RunResult:
    step: int
    train_metrics: dict
    eval_metrics: dict
    run_dir: Path
    stopped_by: str  # "steps", "accuracy", or a signal name
    wall_time_s: float


def train_and_evaluate(cfg: Config, *, devices=None) -> RunResult:
    """Trains `cfg` in its run directory, resuming the run there if it has checkpoints (train/run_dir.py).

    The run directory's lock (train/run_lock.py) is held from the first write to the last, the checkpointer and
    the metrics writer are open inside it, and each is closed on every way out. Raises ConfigError (bad config, a
    run directory in use or not a run), TrainingDiverged or SaveFailed; each message is one line.
    """
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.train.run_dir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))
    tc = cfg.train
    is_main = jax.process_index() == 0
    check_config(cfg, devices)  # every config error before anything is built or written
    check_run_dir(run_dir)  # reads only
    try:  # before the run dir is touched: a data error leaves nothing behind of a run that never started
        stream, eval_sets = build_data(cfg.data, cfg.model.vocab_size, tc.batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir) if is_main else contextlib.nullcontext():
        prepared = prepare_run_dir(cfg, run_dir, is_main=is_main)
        most_labels = max(s.max_labels_per_example for s in [stream, *eval_sets])
        trainer = Trainer(cfg, devices, labels_per_example=most_labels)
        with Checkpointer(run_dir / "checkpoints", max_to_keep=tc.keep_checkpoints, async_save=tc.async_checkpoint,
                          quarantine=is_main) as ckpt:
            params, opt_state, rng, step, resumed = _initial_state(cfg, trainer, ckpt, stream, is_main)
            if resumed:
                changed = {k: list(v) for k, v in prepared.changed.items()}
                resumed = {"step": step, **({"changed": changed} if changed else {})}
            with MetricsWriter(run_dir, total_steps=tc.steps, initial_step=step, progress=tc.progress,
                               is_main=is_main, resumed=resumed or None) as writer:
                step, train_metrics, eval_metrics, stopped_by = _train_loop(
                    cfg, trainer, ckpt, writer, stream, eval_sets, (params, opt_state, rng), step)
    return RunResult(step, train_metrics, eval_metrics, run_dir, stopped_by, time.perf_counter() - t_start)


def _initial_state(cfg: Config, trainer: Trainer, ckpt: Checkpointer, stream, is_main: bool):
    """(params, opt_state, rng, step, resumed): the newest readable checkpoint's state, else `train.init_from`'s
    parameters, else a fresh initialisation. ConfigError where the checkpoint does not fit the config."""
    tc = cfg.train
    params, opt_state, rng = trainer.init_state(tc.seed)
    try:
        restored = ckpt.restore_latest(params, opt_state, rng)
    except CheckpointMismatch as e:
        raise ConfigError(f"train.run_dir: {e}. The config does not describe the saved run; nothing was skipped "
                          "or changed (train.resume=never or a new run_dir with train.init_from are the ways out)"
                          ) from None
    if restored is not None:
        params, opt_state, rng, meta = restored
        step = int(meta["step"])
        saved, now = meta.get("data", {}).get("corpus"), getattr(stream, "fingerprint", None)
        if saved and now and saved != now:  # same config, other files: the resumed batches would differ
            raise ConfigError(f"data.text.source: the checkpoint at step {step} was trained on {saved}, the corpus "
                              f"is now {now} (its files changed); train.resume=never starts over")
        log.info("resumed from %s at step %d", ckpt.directory, step)
        if tc.init_from:
            log.info("train.init_from=%s is ignored: the run resumes from its own checkpoint", tc.init_from)
        return params, opt_state, rng, step, True
    if tc.resume == "require":
        raise ConfigError(f"train.resume=require: no readable checkpoint in {ckpt.directory}")
    if tc.init_from:
        params, report = init_from_checkpoint(params, tc.init_from, tc.init_mismatch)
        opt_state = trainer.init_optimizer(params)
        if is_main:
            write_report(report, Path(tc.run_dir))
    return params, opt_state, rng, 0, False


def _train_loop(cfg: Config, trainer: Trainer, ckpt: Checkpointer, writer: MetricsWriter, stream, eval_sets,
                state, step: int) -> tuple[int, dict, dict, str]:
    """Steps from `step` to train.steps (or a stop): (last step, train metrics, eval metrics, stopped_by)."""
    tc = cfg.train
    params, opt_state, rng = state

    def save(step):
        meta = {"step": step, "data_position": step * tc.batch_size, "seed": tc.seed}
        if hasattr(stream, "position"):  # text task: epoch, window and corpus of the next batch (a function of step)
            meta["data"] = stream.position(step)
        ckpt.save(step, params, opt_state, rng, meta)

    rows_per_proc = tc.batch_size // jax.process_count()
    rows = slice(jax.process_index() * rows_per_proc, (jax.process_index() + 1) * rows_per_proc)
    train_metrics, eval_metrics, stopped_by = {}, {}, "steps"
    last_good_step = ckpt.steps()[-1] if ckpt.steps() else None
    health = trainer.init_health(step)

    def write(step, metrics):
        try:
            writer.write(step, metrics)
        except MetricsWriteFailed as e:
            where = f"step {last_good_step}" if last_good_step is not None else "none saved yet"
            raise SaveFailed(f"{e}; the run stopped. Last good checkpoint: {where} in {ckpt.directory}") from None

    def check_finite():
        """Waits for every dispatched step and stops the run if any of them was not finite (train/health.py)."""
        raise_if_diverged(health, last_good_step=last_good_step, directory=ckpt.directory, wait_for_saves=ckpt.wait)

    # Nothing below reads a step's results back except at log steps and before an evaluation or a checkpoint: the
    # host dispatches step s+1 while step s runs. It waits (without copying anything) for step s-1 before dispatching
    # s+1, so at most two steps are in flight and a SIGTERM is answered within two steps.
    # Step time and tokens/s are measured over the wall time between log steps, less evaluations and saves.
    window_start, window_excluded, window_steps, window_tokens = time.perf_counter(), 0.0, 0, 0
    previous_loss = None

    def device_batch(s):
        return trainer.global_batch(*stream.batch(s, rows))

    # The signal handlers are in place before the prefetch thread starts and until it is joined.
    with _StopSignal() as stop, Prefetcher(device_batch, start=step, stop=tc.steps, depth=tc.prefetch) as batches:
        while step < tc.steps:
            inputs, labels = batches.get(step)
            params, opt_state, health, m = trainer.train_step_checked(params, opt_state, health, inputs, labels)
            ckpt.raise_if_save_failed()  # a failed async save stops the run at once (a check that never waits)
            if previous_loss is not None:
                jax.block_until_ready(previous_loss)
            previous_loss = m["loss"]
            step += 1
            window_steps += 1
            window_tokens += inputs.size
            if step % tc.log_every == 0 or step == tc.steps:
                check_finite()
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                window_time = time.perf_counter() - window_start - window_excluded
                train_metrics = {**m, "lr": float(trainer.schedule(step - 1)),
                                 "step_time_s": window_time / window_steps,
                                 "tokens_per_s": window_tokens / window_time}
                write(step, train_metrics)
                writer.progress(step, m["loss"], train_metrics["tokens_per_s"])
                window_start, window_excluded, window_steps, window_tokens = time.perf_counter(), 0.0, 0, 0
            if step % tc.eval_every == 0 or step == tc.steps:
                check_finite()  # inside the timed window: waiting for the steps is step time
                t_eval = time.perf_counter()
                eval_metrics = {}
                for seg in eval_sets:
                    for k, v in trainer.evaluate(params, seg).items():
                        eval_metrics[f"eval/{seg.name}/{k}"] = v
                eval_metrics["eval/accuracy"] = float(np.mean([eval_metrics[f"eval/{s.name}/accuracy"]
                                                               for s in eval_sets]))
                write(step, eval_metrics)
                if tc.stop_at_accuracy is not None and eval_metrics["eval/accuracy"] >= tc.stop_at_accuracy:
                    stopped_by = "accuracy"
                window_excluded += time.perf_counter() - t_eval
            if stop.received and stopped_by == "steps":
                stopped_by = stop.received
            if step % tc.checkpoint_every == 0 or step == tc.steps or stopped_by != "steps":
                check_finite()  # covers every step since the last check: nothing non-finite is ever saved
                t_save = time.perf_counter()
                save(step)
                last_good_step = step
                window_excluded += time.perf_counter() - t_save
            if stopped_by != "steps":
                break
    return step, train_metrics, eval_metrics, stopped_by
