"""The loss collects auxiliary losses from any layer (layers/aux_loss.py), adds β times their sum and logs each."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.train.config import ConfigError, load_config
from effarch.train.data import build_data
from effarch.train.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
BASE, TINY = ROOT / "configs" / "mqar" / "zoology_attention.yaml", ROOT / "configs" / "overlays" / "tiny.yaml"
MOH = ["model.mixers=[moh, moh]", "model.moh.n_heads=4", "model.moh.top_k=1"]
NAMES = {"blocks/0/mixer/load_balance", "blocks/1/mixer/load_balance"}


def _trainer(tmp_path, *overrides):
    cfg = load_config([BASE, TINY], [f"train.run_dir={tmp_path}", *MOH, *overrides])
    tr = Trainer(cfg)
    stream, _ = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    params, opt, _ = tr.init_state(0)
    return tr, params, opt, tr.global_batch(*stream.batch(0))


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    tr, params, opt, batch = _trainer(tmp_path_factory.mktemp("aux"), "train.aux_loss_weight=0.5")
    return tr, params, opt, batch, jax.jit(tr.gradients)(params, *batch)


def test_aux_losses_are_weighted_into_the_gradient_and_logged(one_batch):
    tr, params, opt, batch, (grads, _, _, aux_mean) = one_batch
    total, (ce_sum, _, count, aux_sums, _) = jax.jit(tr._loss)(params, *batch)
    aux = {name: float(v) / int(count) for name, v in aux_sums.items()}
    assert set(aux) == NAMES and all(v > 0 for v in aux.values())
    # The loss is Σ CE + β · count · Σ aux, i.e. mean CE + β Σ aux after the division by the count.
    np.testing.assert_allclose(float(total), float(ce_sum) + 0.5 * int(count) * sum(aux.values()), rtol=1e-6)
    np.testing.assert_allclose([float(aux_mean[n]) for n in sorted(NAMES)], [aux[n] for n in sorted(NAMES)],
                               rtol=1e-5)
    # Each one is logged under its own name.
    metrics = jax.eval_shape(tr._step, params, opt, *batch)[2]
    assert {f"aux/{n}" for n in NAMES} <= set(metrics)
    # With top_k = 1 the routers learn from the load balance only: without β their gradient is zero.
    ce_grads = jax.jit(jax.grad(lambda p: tr._forward(p, *batch)[0]))(params)
    for block in (0, 1):
        def router(g):
            return np.asarray(g["blocks"][block]["mixer"]["router"]["kernel"][...])

        # float32 rounding of p / p leaves ~1e-8 in the summed cross entropy's gradient.
        assert np.max(np.abs(router(ce_grads))) < 1e-3 * np.max(np.abs(router(grads)))
        assert np.max(np.abs(router(grads))) > 1e-5


def test_aux_losses_under_grad_accumulation_and_remat(one_batch, tmp_path):
    _, _, _, _, (g1, loss1, _, aux1) = one_batch
    tr, params, _, batch = _trainer(tmp_path, "train.aux_loss_weight=0.5", "train.grad_accum_steps=4",
                                    "model.remat=true")
    g4, loss4, _, aux4 = jax.jit(tr.gradients)(params, *batch)
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
    assert set(aux1) == set(aux4) == NAMES
    # Each micro-batch's f_i, P_i are means over its own tokens, so only a count-weighted mean is comparable.
    for name in NAMES:
        assert abs(float(aux4[name]) - float(aux1[name])) < 0.5 * float(aux1[name])
    # nnx.remat keeps the AuxLoss writes, so the routers still get the load-balance gradient.
    router = np.asarray(g4["blocks"][0]["mixer"]["router"]["kernel"][...])
    assert np.max(np.abs(router)) > 1e-6 and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g4))


def test_negative_aux_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="aux_loss_weight"):
        load_config([BASE, TINY], ["train.aux_loss_weight=-1"])
