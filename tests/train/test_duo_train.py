"""DuoAttention's gate training (train.objective duo; configs/passkey/duo_gates.yaml): the loss is hidden-state
distillation against the same model with every gate at 1 plus λ·mean|α|, a frozen model's step moves only the gates,
and the gates stay in [0, 1]. The gated layer and the `duo` policy: tests/layers/test_duo.py."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.trained_state import SAVED
from effarch.train import param_tree
from effarch.train.checks import check_config
from effarch.train.config import ConfigError, load_config
from effarch.train.data import build_data
from effarch.train.lora import build_model
from effarch.train.train import Trainer, _clamped

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "configs" / "passkey" / "attention_moa.yaml", ROOT / "configs" / "passkey" / "duo_gates.yaml"]
SMALL = ["model.d_model=16", "model.attention.n_heads=4", "model.attention.n_kv_heads=2", "data.seq_len=48",
         "data.passkey.examples=64", "train.batch_size=8", "optim.warmup_steps=0", "model.attention.duo_sink=4",
         "model.attention.duo_window=8"]
LAMBDA = 0.05


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """(trainer, its initial parameters (eager: no compile), one batch)."""
    cfg = load_config(CONFIGS, [f"train.run_dir={tmp_path_factory.mktemp('duo')}", *SMALL])
    tr = Trainer(cfg)
    stream, _ = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    _, params, tr.rest = nnx.split(build_model(cfg, nnx.Rngs(0)), SAVED, ...)  # as Trainer.init_state, eagerly
    return tr, params, tr.global_batch(*stream.batch(0))


def with_gates(params, gates):
    return param_tree.map_variables(
        lambda path, var: jnp.asarray(gates[path], var.dtype) if path in gates else var[...], params)


GATES = ("blocks/0/mixer/duo_gate", "blocks/1/mixer/duo_gate")


def test_loss_is_distillation_plus_l1(trainer):
    tr, params, batch = trainer
    loss_and_grad = jax.jit(jax.value_and_grad(tr._loss, has_aux=True))  # one compile for both gate settings
    # Every gate at 1 (the init): the model is the full-attention model, the distillation term is 0, and the gradient
    # of the mean loss on each of the 4 gates is the L1 term's alone, λ / 4.
    (total, (_, _, count, aux, _)), grads = loss_and_grad(params, *batch)
    n = int(count)
    assert float(aux["duo_distill"]) == 0.0
    np.testing.assert_allclose(float(aux["duo_l1"]) / n, 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(total) / n, LAMBDA, rtol=1e-6)
    grads = param_tree.flatten(grads)
    for path in GATES:
        np.testing.assert_allclose(np.asarray(grads[path]) / n, LAMBDA / 4, rtol=1e-5)
    # Gates below 1: the mixed model moves away from the full one; the L1 term is the mean gate, and the gates'
    # gradient now has the distillation's part too.
    half = with_gates(params, {GATES[0]: [0.5, 0.0], GATES[1]: [1.0, 0.25]})
    (total, (_, _, count, aux, _)), grads = loss_and_grad(half, *batch)
    assert float(aux["duo_distill"]) > 0
    np.testing.assert_allclose(float(aux["duo_l1"]) / int(count), 1.75 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(total), float(aux["duo_distill"]) + LAMBDA * float(aux["duo_l1"]), rtol=1e-6)
    assert not np.allclose(np.asarray(param_tree.flatten(grads)[GATES[0]]) / int(count), LAMBDA / 4)


@pytest.mark.slow  # the default suite trains a duo step: tests/configs/test_configs.py (passkey/duo_gates.yaml)
def test_a_frozen_step_moves_only_the_gates_and_keeps_them_in_bounds(trainer):
    tr, params, batch = trainer
    opt = tr.init_optimizer(params)
    before = {k: np.asarray(v) for k, v in param_tree.flatten(params).items()}
    new, _, metrics = tr.train_step(params, opt, *batch)
    after = {k: np.asarray(v) for k, v in param_tree.flatten(new).items()}
    assert {"aux/duo_distill", "aux/duo_l1"} <= set(metrics)
    for path in before:
        if path in GATES:
            assert (after[path] < before[path]).all() and (after[path] >= 0).all()  # L1 pulls them down from 1
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    # The clamp after every update: a gate's `bounds` metadata.
    clipped = param_tree.flatten(_clamped(with_gates(params, {GATES[0]: [1.3, -0.2], GATES[1]: [0.5, 1.0]})))
    np.testing.assert_array_equal(clipped[GATES[0]], [1.0, 0.0])
    np.testing.assert_array_equal(clipped[GATES[1]], [0.5, 1.0])


def test_objective_duo_needs_gates():
    cfg = load_config(CONFIGS, ["model.attention.duo_gates=false"])
    with pytest.raises(ConfigError, match="train.objective duo trains DuoAttention gates: it needs "
                                          "model.attention.duo_gates true"):
        check_config(cfg, jax.devices()[:1])
