"""Run by test_mesh.py in a subprocess with 8 CPU devices: one LM whose layers are the mixers named on the command
line (one layer each, at the registry's small configs), its loss and gradients on one device and on a
data x fsdp x tensor = 2 x 2 x 2 mesh (parameters sharded by the logical-axis rules). One model for all mixers: two
compiles in all. Prints one JSON line: {"loss": error, mixer: error of its layer's gradients, ...} (relative)."""

import json
import sys

import jax
import numpy as np

from effarch.train.config import Config, MeshConfig, TrainConfig
from effarch.train.train import Trainer
from tests.conformance.test_mixers import small_config

V, B, T = 37, 8, 12


def gradients(names: list[str], devices, mesh: MeshConfig):
    cfg = Config(model=small_config(vocab_size=V, n_layers=len(names), mixers=tuple(names)), mesh=mesh,
                 train=TrainConfig(batch_size=B))
    trainer = Trainer(cfg, devices)
    params, _, _ = trainer.init_state(0)
    tokens = np.random.default_rng(0).integers(0, V, (B, T + 1))
    with jax.set_mesh(trainer.mesh):
        grads, loss, _, _ = jax.jit(trainer.gradients)(params, *trainer.global_batch(tokens[:, :-1], tokens[:, 1:]))
    return jax.device_get(grads), float(loss)


def rel(a, b) -> float:
    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(names: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    g1, loss1 = gradients(names, jax.devices()[:1], MeshConfig(data=1))
    g8, loss8 = gradients(names, jax.devices(), MeshConfig(data=2, fsdp=2, tensor=2))
    errors = {"loss": abs(loss8 - loss1) / abs(loss1)}
    for i, name in enumerate(names):
        errors[name] = rel(jax.tree.leaves(g8["blocks"][i]), jax.tree.leaves(g1["blocks"][i]))
    print(json.dumps(errors))


if __name__ == "__main__":
    main(sys.argv[1:])
