"""The Lightning and BASED layers on their Pallas kernels (interpreted through EFFARCH_PALLAS_INTERPRET): the parallel
forward and its gradients equal the "xla" layer's, and prefill + token-by-token decode equals the parallel forward.
Sizes are Pallas-legal (head / feature dims 16, value dim 16 or 32, chunks of 16) with T = 37 not a multiple."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.based import BasedConfig, BasedLinearAttention
from effarch.layers.lightning import LightningAttention, LightningConfig
from effarch.pallas_kernels.interpret import ENV_VAR
from tests.helpers.numerics import assert_close

T, PROMPT = 37, 20


def make_layer(op: str, implementation: str):
    if op == "lightning":  # D 48, 3 heads of 16
        config = LightningConfig(n_heads=3, block_size=16, implementation=implementation)
        return LightningAttention(48, config, layer_idx=1, n_layers=3, rngs=nnx.Rngs(0)), 48
    config = BasedConfig(feature_dim=16, n_heads=3, chunk_size=16, implementation=implementation)  # V = 96 / 3
    return BasedLinearAttention(96, config, rngs=nnx.Rngs(0)), 96


@pytest.mark.parametrize("op, name", [
    ("lightning", "pallas_gpu"),
    ("based", "pallas_tpu"),
    pytest.param("lightning", "pallas_tpu", marks=pytest.mark.slow),
    pytest.param("based", "pallas_gpu", marks=pytest.mark.slow),
])
def test_layer_on_kernel_matches_xla_and_decodes(monkeypatch, op, name):
    monkeypatch.setenv(ENV_VAR, "1")
    layer, d = make_layer(op, name)
    xla_layer, _ = make_layer(op, "xla")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, T, d)), jnp.float32)
    graphdef, params = nnx.split(layer)
    xla_graphdef, _ = nnx.split(xla_layer)

    def loss(params, graphdef, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * jnp.sin(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, graphdef, x)
    (_, y_xla), grads_xla = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, xla_graphdef, x)
    assert_close("forward", y, y_xla, 1e-5)
    for (path, g), (_, g_xla) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                     jax.tree_util.tree_leaves_with_path(grads_xla)):
        assert_close(f"grad {jax.tree_util.keystr(path)}", g, g_xla, 1e-5)

    def generate(params, x):
        layer = nnx.merge(graphdef, params)
        state, y_prompt = layer.prefill(layer.init_state(2, T), x[:, :PROMPT])
        _, y_steps = jax.lax.scan(layer.decode_step, state, x[:, PROMPT:].swapaxes(0, 1))
        return jnp.concatenate([y_prompt, y_steps.swapaxes(0, 1)], axis=1)

    assert_close("prefill + decode", jax.jit(generate)(params, x), y, 1e-5)


def test_based_prefill_accepts_the_kernel_names():
    # No prefill kernel: the Pallas names run the chunked XLA scan (so no interpretation is needed here).
    layer, d = make_layer("based", "pallas_tpu")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 9, d)), jnp.float32)
    xla = dataclasses.replace(layer.config, implementation="xla")
    state, y = layer.prefill(layer.init_state(1, 9), x)
    layer.config = xla
    state_xla, y_xla = layer.prefill(layer.init_state(1, 9), x)
    assert jnp.array_equal(y, y_xla) and jnp.array_equal(state.kv, state_xla.kv)
