"""The "xla" path (block tiling + custom_vjp two-pass backward) against the reference oracles."""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels.lightning import lightning_attention, lightning_attention_with_state, reference
from tests.helpers.numerics import assert_close, value_and_grads
from tests.pallas_kernels.lightning.inputs import DECAY, H, make_inputs


# Jitted so that each oracle compiles once per shape instead of op by op (the CPU test budget is small).
@jax.jit
def _quadratic(q, k, v, decay):
    return reference.lightning_quadratic(q, k, v, decay)[0]


_scan = jax.jit(reference.lightning_scan)
_quadratic_with_state = jax.jit(reference.lightning_quadratic)


@pytest.mark.parametrize("t_len", [63, 64, 129])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_xla_fwd_bwd_matches_reference(t_len, block_size):
    q, k, v, _, d_out, _ = make_inputs(t_len)
    xla = functools.partial(lightning_attention, block_size=block_size, implementation="xla")
    out, (dq, dk, dv, ddecay) = value_and_grads(xla, (q, k, v, DECAY), d_out)
    out_ref, grads_ref = value_and_grads(_quadratic, (q, k, v, DECAY), d_out)
    assert_close("out", out, out_ref, rtol=1e-5)
    assert_close("out vs recurrence", out, _scan(q, k, v, DECAY)[0], rtol=1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref[:3]):
        assert_close(name, g, g_ref, rtol=1e-5)
    # The decay is a fixed schedule: a zero cotangent by design.
    assert not jnp.any(ddecay)


@pytest.mark.parametrize("t_len, block_size", [(37, 16), (129, 32)])
def test_xla_with_state_fwd_bwd_matches_reference(t_len, block_size):
    """Initial state in, final state out, and both cotangents through the custom backward."""
    q, k, v, state, d_out, d_state = make_inputs(t_len, seed=1)

    def xla(q, k, v, state):
        return lightning_attention_with_state(q, k, v, DECAY, state, block_size=block_size, implementation="xla")

    def ref(q, k, v, state):
        return _quadratic_with_state(q, k, v, DECAY, state)

    # Two outputs, so jax.vjp directly (value_and_grads takes one cotangent array).
    (out, final), vjp = jax.vjp(xla, q, k, v, state)
    (out_ref, final_ref), vjp_ref = jax.vjp(ref, q, k, v, state)
    grads, grads_ref = vjp((d_out, d_state)), vjp_ref((d_out, d_state))
    out_scan, final_scan = _scan(q, k, v, DECAY, state)
    assert_close("out", out, out_ref, rtol=1e-5)
    assert_close("out vs recurrence", out, out_scan, rtol=1e-5)
    assert_close("final_state", final, final_ref, rtol=1e-5)
    assert_close("final_state vs recurrence", final, final_scan, rtol=1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_ref):
        assert_close(name, g, g_ref, rtol=1e-5)


def test_xla_chunks_with_carried_state_equal_one_call():
    q, k, v, _, _, _ = make_inputs(101, seed=2)
    run = functools.partial(lightning_attention_with_state, decay=DECAY, block_size=16, implementation="xla")
    out, final = run(q, k, v)
    # A split inside a block, so the first call ends on a partial block.
    out_a, state = run(q[:, :41], k[:, :41], v[:, :41])
    out_b, final_b = run(q[:, 41:], k[:, 41:], v[:, 41:], initial_state=state)
    assert_close("out", jnp.concatenate([out_a, out_b], axis=1), out, rtol=1e-5)
    assert_close("final_state", final_b, final, rtol=1e-5)


def test_zero_decay_is_causal_linear_attention():
    q, k, v, _, _, _ = make_inputs(45, seed=3)
    t_len = q.shape[1]
    causal = jnp.tril(jnp.ones((t_len, t_len), bool))
    scores = jnp.where(causal[None], jnp.einsum("BTHK,BSHK->BHTS", q, k), 0.0)
    expected = jnp.einsum("BHTS,BSHV->BTHV", scores, v)
    out = lightning_attention(q, k, v, jnp.zeros((H,), jnp.float32), block_size=16, implementation="xla")
    assert_close("out", out, expected, rtol=1e-5)


def test_large_decay_is_near_diagonal_and_finite():
    """s = 10 leaves λ = 4.5e-5; s = 1000 underflows every off-diagonal power (and λ^-C would overflow)."""
    q, k, v, _, d_out, _ = make_inputs(70, seed=4)
    decay = jnp.array([10.0, 100.0, 1000.0], jnp.float32)
    xla = functools.partial(lightning_attention, block_size=32, implementation="xla")
    out, grads = value_and_grads(xla, (q, k, v, decay), d_out)
    out_ref, grads_ref = value_and_grads(_quadratic, (q, k, v, decay), d_out)
    diagonal = jnp.einsum("BTHK,BTHK->BTH", q, k)[..., None] * v
    assert_close("out vs (q_t·k_t) v_t", out, diagonal, rtol=2e-4)
    assert_close("out", out, out_ref, rtol=1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads[:3], grads_ref[:3]):
        assert_close(name, g, g_ref, rtol=1e-5)


def test_xla_bfloat16_inputs_accumulate_in_float32():
    """bf16 in and out, but the error against the f32 oracle on the same (rounded) inputs is only the output cast."""
    q, k, v, _, d_out, _ = make_inputs(37, seed=5)
    q, k, v, d_out = (x.astype(jnp.bfloat16) for x in (q, k, v, d_out))
    xla = functools.partial(lightning_attention, block_size=16, implementation="xla")
    out, grads = value_and_grads(xla, (q, k, v, DECAY), d_out)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads[:3])
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_ref, grads_ref = value_and_grads(_quadratic, (*as_f32, DECAY), d_out.astype(jnp.float32))
    # bf16 has an 8-bit mantissa: one rounding of the result is at most 2^-8 relative to its own magnitude.
    assert_close("out", out.astype(jnp.float32), out_ref, rtol=2**-8)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads[:3], grads_ref[:3]):
        assert_close(name, g.astype(jnp.float32), g_ref, rtol=2**-8)
