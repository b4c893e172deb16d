"""BASED public API: dispatch rules, prefill + decode steps == the parallel form."""

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels import based
from effarch.pallas_kernels.based import reference
from tests.helpers.numerics import assert_close, rel_err
from tests.pallas_kernels.based.test_reference import B, H, V, make_inputs


def test_default_on_cpu_is_xla_and_implementations_agree():
    q, k, v, _ = make_inputs(20, T=37, F=8)

    @jax.jit
    def paths(q, k, v):
        return (
            based.based_linear_attention(q, k, v, chunk_size=16),
            based.based_linear_attention(q, k, v, chunk_size=16, implementation="xla"),
            based.based_linear_attention(q, k, v, implementation="reference"),
            based.based_linear_attention(q, k, v, implementation=("reference", "xla")),
        )

    out, out_xla, out_ref, out_seq = paths(q, k, v)
    assert_close("default", out, out_xla, 0.0)
    assert_close("xla", out_xla, out_ref, 1e-5)
    assert_close("sequence", out_seq, out_ref, 0.0)


def test_eps_is_passed_through():
    q, k, v, _ = make_inputs(21, T=5, F=8)
    expected = reference.based_quadratic(q, k, v, eps=100.0)
    # eps = 100 is comparable to the denominators (>= (t + 1) / 2), so ignoring it would show.
    assert rel_err(expected, reference.based_quadratic(q, k, v)) > 1e-2
    for impl in ("reference", "xla"):
        out = jax.jit(lambda q, k, v: based.based_linear_attention(q, k, v, eps=100.0, implementation=impl))(q, k, v)
        assert_close(impl, out, expected, 1e-5)


def test_unknown_implementation_raises():
    q, k, v, _ = make_inputs(22, T=5, F=8)
    for impl in ("triton", ("xla", "cudnn")):
        with pytest.raises(ValueError, match="unknown implementation"):
            based.based_linear_attention(q, k, v, implementation=impl)
    with pytest.raises(ValueError, match="unknown implementation"):
        based.based_prefill(q, k, v, implementation="triton")


@pytest.mark.parametrize("prompt", [1, 20])
def test_prefill_then_decode_steps_match_parallel(prompt):
    T, F = 29, 8
    q, k, v, _ = make_inputs(23, T=T, F=F)

    @jax.jit
    def generate(q, k, v):
        state = based.based_init_state(B, H, F, V)
        out, state = based.based_prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], initial_state=state, chunk_size=8)
        state, outs = jax.lax.scan(
            lambda s, x: based.based_decode_step(s, *x), state, tuple(a[:, prompt:].swapaxes(0, 1) for a in (q, k, v))
        )
        return jnp.concatenate([out, outs.swapaxes(0, 1)], axis=1), state

    out, state = generate(q, k, v)
    assert_close("decode", out, reference.based_quadratic(q, k, v), 1e-5)
    _, state_full = based.based_prefill(q, k, v, implementation="reference")
    assert_close("kv_state", state.kv, state_full.kv, 1e-5)
    assert_close("k_state", state.k, state_full.k, 1e-5)


def test_state_shape_is_independent_of_length():
    # Symmetric degree-2 features: 1 + 16 + 16 * 17 / 2 = 153 per head at F = 16 (the full square map had 273).
    state = based.based_init_state(B, H, 16, V)
    assert state.kv.shape == (B, H, 153, V) and state.k.shape == (B, H, 153)
    assert state.kv.dtype == jnp.float32 and state.k.dtype == jnp.float32
