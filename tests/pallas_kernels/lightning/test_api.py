"""Dispatch of `implementation=` and the public decode step."""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_step,
    lightning_attention_with_state,
)
from tests.helpers.numerics import assert_close, value_and_grads
from tests.pallas_kernels.lightning.inputs import DECAY, make_inputs


def test_default_runs_xla_and_reference_agrees():
    q, k, v, _, d_out, _ = make_inputs(21)
    out_default = lightning_attention(q, k, v, DECAY, block_size=8)
    out_xla = lightning_attention(q, k, v, DECAY, block_size=8, implementation="xla")
    assert jnp.array_equal(out_default, out_xla)
    ref = jax.jit(functools.partial(lightning_attention, block_size=8, implementation="reference"))
    out_ref, grads_ref = value_and_grads(ref, (q, k, v, DECAY), d_out)
    assert_close("out", out_xla, out_ref, rtol=1e-5)
    # The reference path stops the decay gradient too, so every path returns the same cotangents.
    assert not jnp.any(grads_ref[3])


@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu"])
def test_explicit_implementation_that_cannot_run_raises(name):
    q, k, v, _, _, _ = make_inputs(9)
    with pytest.raises(NotImplementedError, match=name):
        lightning_attention(q, k, v, DECAY, implementation=name)


def test_sequence_falls_back_with_warning_and_fails_with_all_reasons():
    q, k, v, _, _, _ = make_inputs(9)
    with pytest.warns(UserWarning, match="pallas_gpu unavailable"):
        out = lightning_attention(q, k, v, DECAY, block_size=4, implementation=("pallas_gpu", "xla"))
    assert_close("out", out, lightning_attention(q, k, v, DECAY, block_size=4, implementation="xla"), rtol=0.0)
    with pytest.raises(ExceptionGroup), pytest.warns(UserWarning):
        lightning_attention(q, k, v, DECAY, implementation=("pallas_gpu", "pallas_tpu"))


def test_unknown_implementation_and_bad_block_size_raise_value_error():
    q, k, v, _, _, _ = make_inputs(9)
    with pytest.raises(ValueError, match="unknown implementation"):
        lightning_attention(q, k, v, DECAY, implementation="triton")
    with pytest.raises(ValueError, match="block_size"):
        lightning_attention(q, k, v, DECAY, block_size=0)


def test_prefill_then_decode_steps_equal_one_call():
    q, k, v, _, _, _ = make_inputs(29, seed=5)
    out = lightning_attention(q, k, v, DECAY, block_size=8)
    prefix = 19
    out_prefix, state = lightning_attention_with_state(q[:, :prefix], k[:, :prefix], v[:, :prefix], DECAY, block_size=8)
    steps = []
    for t in range(prefix, q.shape[1]):
        state, o_t = lightning_attention_step(state, q[:, t], k[:, t], v[:, t], DECAY)
        steps.append(o_t)
    assert_close("prefill", out_prefix, out[:, :prefix], rtol=1e-5)
    assert_close("decode", jnp.stack(steps, axis=1), out[:, prefix:], rtol=1e-5)


def test_xla_under_jit_and_grad():
    q, k, v, _, _, _ = make_inputs(33)

    @jax.jit
    def loss(q, k, v):
        return jnp.sum(lightning_attention(q, k, v, DECAY, block_size=16, implementation="xla") ** 2)

    @jax.jit
    def loss_ref(q, k, v):
        return jnp.sum(lightning_attention(q, k, v, DECAY, implementation="reference") ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(q, k, v)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, rtol=1e-5)
