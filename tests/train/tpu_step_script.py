"""Run by test_tpu_step.py in a subprocess (libtpu can abort the process): `check_config` and then the compile of the
training step `effarch train` runs (`Trainer._train_step_checked`, sharded over the config's mesh) for a TPU slice
described from this CPU host (jax.experimental.topologies), nothing allocated. Command line: TOPOLOGY CONFIG
[key=value overrides...]. Prints one JSON line {"kernels": Mosaic kernel calls in the lowered step, "temp_bytes":
per-device temporaries}.

`compile_train_step` is the reusable part: any step-compile test (or tool) calls it with a config and the devices.
"""

import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from effarch.arches.lm import DecoderLM
from effarch.train.checks import check_config
from effarch.train.config import load_config
from effarch.train.health import init_health
from effarch.train.train import Trainer

# topology name -> (chip_config_name, chips_per_host_bounds) for get_topology_desc
TOPOLOGIES = {"v5p:2x2x1": ("megacore", (2, 2, 1)), "v5e:2x2": ("default", (2, 2, 1)),
              "v6e:2x2": ("default", (2, 2, 1))}


def topology_devices(name: str) -> list:
    chip_config, bounds = TOPOLOGIES[name]
    return topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                        chips_per_host_bounds=bounds, num_slices=1).devices


def compile_train_step(cfg, devices, seq_len: int | None = None):
    """(lowered, compiled) `Trainer(cfg, devices)._train_step_checked` on abstract, sharded inputs of shape
    [train.batch_size, seq_len or data.seq_len]. The Trainer's steps put their mesh in context themselves, so the
    kernels shard over it and follow its devices' platform; the caller sets no mesh."""
    trainer = Trainer(cfg, devices)
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    # The non-parameter state is closed over as constants (a run gets it from its init); zeros of its shapes here.
    trainer.rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)

    def spec(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = jax.tree.map(spec, params, trainer.param_sharding)
    opt_state = jax.tree.map(spec, jax.eval_shape(trainer.tx.init, params), trainer.opt_sharding)
    health = jax.tree.map(lambda x: spec(x, trainer.replicated), jax.eval_shape(lambda: init_health(0)))
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, seq_len or cfg.data.seq_len), jnp.int32,
                                  sharding=trainer.batch_sharding)
    lowered = trainer._train_step_checked.lower(params, opt_state, health, tokens, tokens)
    return lowered, lowered.compile()


def main(topology: str, config: str, overrides: list[str]) -> None:
    cfg = load_config([config], overrides)
    devices = topology_devices(topology)
    check_config(cfg, devices)  # the config check for the TPU target passes (kernels probed at a shape they take)
    lowered, compiled = compile_train_step(cfg, devices)
    print(json.dumps({"kernels": lowered.as_text().count("tpu_custom_call"),
                      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
