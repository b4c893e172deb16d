"""Compile jobs for whole training steps: `effarch train`'s jitted step for a config, compiled for a TPU slice that
libtpu describes (tests/tpu/harness.py runs them in a child process).

`compile_train_step` builds the project's own `Trainer(cfg, devices)` over the slice's devices, gives the step
abstract inputs carrying the trainer's shardings (parameters from `nnx.eval_shape`, optimizer state from
`jax.eval_shape(tx.init)`, the batch of `train.batch_size` windows of the task's sequence length) and compiles
`Trainer._train_step_checked`, the step the training loop runs. Nothing is allocated but the model's non-parameter
variables (scalars, on the host's CPU).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config, load_config
from effarch.train.data import mqar
from effarch.train.health import init_health
from effarch.train.train import Trainer
from tests.tpu.harness import REPO, Job, tpu_devices


def train_seq_len(cfg: Config) -> int:
    """Tokens per training window: the longest MQAR training segment, or data.seq_len for the other tasks."""
    if cfg.data.task != "mqar":
        return cfg.data.seq_len
    segments = mqar.TRAIN_SEGMENTS if cfg.data.mqar.mixture == "zoology_standard" else cfg.data.mqar.train_segments
    return max(seq_len for seq_len, *_ in segments)


def compile_train_step(config: str, overrides: list[str], topology: str, num_slices: int = 1) -> None:
    """Compiles the checked training step of `config` (a path under the repository) with `overrides` for
    `num_slices` TPU slices `topology` ("v5p:2x2x1", or a generation of harness.SLICES)."""
    cfg = load_config([REPO / config], overrides)
    trainer = Trainer(cfg, tpu_devices(topology, num_slices))
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    # The step closes over the non-parameter variables (auxiliary-loss scalars that every forward pass overwrites):
    # zeros of their shapes, as uncommitted jax arrays (the forward pass writes into them; numpy arrays refuse that).
    trainer.rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)

    def with_sharding(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    params = with_sharding(params, trainer.param_sharding)
    opt_state = with_sharding(jax.eval_shape(trainer.tx.init, params), trainer.opt_sharding)
    health = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated),
                          init_health(0))
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, train_seq_len(cfg)), jnp.int32,
                                 sharding=trainer.batch_sharding)
    with jax.set_mesh(trainer.mesh):
        trainer._train_step_checked.lower(params, opt_state, health, batch, batch).compile()


def step_job(config: str, topology: str, overrides: tuple[str, ...] = ()) -> Job:
    """The job compiling `config`'s training step for `topology`; its name gives the mixers, batch and dtype."""
    cfg = load_config([REPO / config], overrides)
    mixers = "+".join(dict.fromkeys(cfg.model.mixers))
    detail = f", {' '.join(overrides)}" if overrides else ""
    return Job(
        name=f"{config} ({mixers}) training step on {topology}, batch {cfg.train.batch_size}x{train_seq_len(cfg)}, "
             f"{cfg.train.compute_dtype}{detail}",
        target="tests.tpu.steps:compile_train_step",
        kwargs={"config": config, "overrides": list(overrides), "topology": topology},
    )
