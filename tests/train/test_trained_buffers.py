"""Trained buffers (layers/trained_state.py) in the training loop, with the routing policy's k-means centroids: the
step writes the value the training-mode forward pass computed (the EMA of layers/sparse_routing.py), the optimizer
keeps no moments for them and gives them no update, `effarch train` checkpoints them and `effarch generate` /
`effarch convert` read them back; with gradient accumulation the written value is the mean over micro-batches."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.trained_state import SAVED, TrainedBuffer
from effarch.train import param_tree
from effarch.train.config import load_config
from effarch.train.data import build_data
from effarch.train.generate import load_run
from effarch.train.train import (
    Trainer,
    _cast_floating,
    _with_buffers,
    buffer_paths,
    decays,
    make_optimizer,
    train_and_evaluate,
)

ROOT = Path(__file__).resolve().parents[2]
BASE, TINY = ROOT / "configs" / "mqar" / "zoology_attention.yaml", ROOT / "configs" / "overlays" / "tiny.yaml"
ROUTING = ["model.mixers=[zoology_base_conv, sparse_attention]", "model.sparse_attention.pattern=routing",
           "model.sparse_attention.block_size=8", "model.sparse_attention.routing_clusters=4",
           "model.sparse_attention.n_heads=2", "model.sparse_attention.rope=false"]
CENTROIDS = "blocks/1/mixer/policy/centroids"


def _config(tmp_path, *overrides):
    return load_config([BASE, TINY], [f"train.run_dir={tmp_path}", *ROUTING, *overrides])


def _centroids(params) -> np.ndarray:
    return np.asarray(param_tree.flatten(params)[CENTROIDS])


def _written(tr: Trainer, params, inputs) -> np.ndarray:
    """The centroids a training-mode forward pass of the model at `params` writes."""
    def forward(params, inputs):
        model = nnx.merge(tr.graphdef, params, tr.rest, copy=True)
        model.train()
        model.hidden(inputs)
        return nnx.state(model, SAVED)

    return _centroids(jax.jit(forward)(params, inputs))


def test_buffers_get_no_moments_no_decay_no_cast_and_take_the_written_value():
    """The trainer's helpers on a small state of one parameter and one trained buffer (no model compile)."""
    class Layer(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 3)))
            self.mu = TrainedBuffer(jnp.full((2, 3), 0.5))

    _, params = nnx.split(Layer(), SAVED)
    assert buffer_paths(params) == {"mu"}
    assert not decays("mu", params["mu"]) and decays("w", params["w"])
    cfg = load_config([BASE, TINY], [])
    tx, _ = make_optimizer(cfg, params)
    assert not any(p.endswith("/mu") for p in param_tree.flatten(tx.init(params)))
    low = _cast_floating(params, jnp.bfloat16)
    assert low["w"][...].dtype == jnp.bfloat16 and low["mu"][...].dtype == jnp.float32
    new = _with_buffers(params, {"mu": jnp.full((2, 3), 2.0)})
    np.testing.assert_array_equal(np.asarray(new["mu"][...]), 2.0)
    np.testing.assert_array_equal(np.asarray(new["w"][...]), 1.0)
    assert type(new["mu"]) is TrainedBuffer


@pytest.mark.slow
def test_the_step_writes_the_forward_passs_centroids_and_the_optimizer_leaves_them_alone(tmp_path):
    cfg = _config(tmp_path)
    tr = Trainer(cfg)
    stream, _ = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    params, opt, _ = tr.init_state(0)
    inputs, labels = tr.global_batch(*stream.batch(0))
    mu0 = _centroids(params)
    expected = _written(tr, params, inputs)
    assert np.abs(expected - mu0).max() > 1e-6  # the EMA moves them
    # No optimizer moments for them (a zero update, no state), and no weight decay.
    assert not any(CENTROIDS in path for path in param_tree.flatten(opt))
    new_params, _, metrics = jax.jit(tr._step)(params, opt, inputs, labels)
    np.testing.assert_allclose(_centroids(new_params), expected, atol=1e-7)
    assert np.isfinite(float(metrics["loss"])) and "aux/blocks/1/mixer/policy/commitment" in metrics
    # A parameter trains as usual.
    kernel = "blocks/1/mixer/q_proj/kernel"
    assert np.abs(np.asarray(param_tree.flatten(new_params)[kernel]) -
                  np.asarray(param_tree.flatten(params)[kernel])).max() > 0


@pytest.mark.slow
def test_grad_accumulation_writes_the_mean_over_micro_batches(tmp_path):
    cfg = _config(tmp_path, "train.grad_accum_steps=2")
    tr = Trainer(cfg)
    stream, _ = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    params, opt, _ = tr.init_state(0)
    inputs, labels = tr.global_batch(*stream.batch(0))
    halves = [_written(tr, params, inputs[i * 4:(i + 1) * 4]) for i in range(2)]
    new_params, _, _ = jax.jit(tr._step)(params, opt, inputs, labels)
    np.testing.assert_allclose(_centroids(new_params), (halves[0] + halves[1]) / 2, atol=1e-7)


@pytest.mark.slow
def test_effarch_train_checkpoints_the_centroids_and_generate_and_convert_read_them(tmp_path):
    from effarch.train.convert import convert_run, load_run_params

    cfg = _config(tmp_path / "run")
    fresh = Trainer(cfg).init_state(cfg.train.seed)[0]
    result = train_and_evaluate(cfg)
    assert result.step == 2
    _, model = load_run(tmp_path / "run")
    trained = np.asarray(model.blocks[1].mixer.policy.centroids[...])
    assert np.abs(trained - _centroids(fresh)).max() > 1e-6  # two EMA steps, saved and restored
    # Converting the routing run to dense attention drops them; converting back gives fresh ones.
    dense = convert_run(tmp_path / "run", tmp_path / "dense", "attention")
    assert not any("policy" in p for p in param_tree.flatten(load_run_params(dense)[1]))
    back = convert_run(dense, tmp_path / "back", "sparse_attention", ["pattern=routing", "routing_clusters=4"])
    mu = np.asarray(param_tree.flatten(load_run_params(back)[1])[CENTROIDS])
    np.testing.assert_allclose(np.linalg.norm(mu, axis=-1), 1.0, rtol=1e-5)  # a fresh init: unit vectors
    assert jnp.isfinite(mu).all()
