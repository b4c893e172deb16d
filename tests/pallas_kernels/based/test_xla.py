"""BASED chunked XLA form: == quadratic oracle == recurrence (values, gradients, states), padding, O(T) memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.based import reference, xla
from tests.helpers.numerics import assert_close, value_and_grads
from tests.pallas_kernels.based.test_reference import make_inputs

CASES = [
    # (T, F, chunk_size): C = 64 > T = 37 is capped at T; 100 = 3 * 32 + 4 pads the last chunk.
    (37, 16, 64),
    (64, 8, 16),
    (100, 16, 32),
]


@pytest.mark.parametrize("T, F, C", CASES)
def test_chunk_fwd_bwd_matches_reference_and_recurrence(T, F, C):
    q, k, v, cotangent = make_inputs(10, T=T, F=F)
    chunked = functools.partial(xla.based_chunked, chunk_size=C)

    @jax.jit
    def paths(q, k, v, cotangent):
        out, grads = value_and_grads(lambda *a: chunked(*a)[0], (q, k, v), cotangent)
        out_ref, grads_ref = value_and_grads(reference.based_quadratic, (q, k, v), cotangent)
        out_rec, state_rec = reference.based_recurrent(q, k, v)
        return out, grads, out_ref, grads_ref, out_rec, state_rec, chunked(q, k, v)[1]

    out, grads, out_ref, grads_ref, out_rec, state_rec, state = paths(q, k, v, cotangent)
    assert_close("out", out, out_ref, 1e-5)
    assert_close("out_recurrent", out_rec, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-4)
    # The carried state equals the recurrent one: padded tail keys (phi(0) = e_0) must not leak into it.
    assert_close("kv_state", state.kv, state_rec.kv, 1e-5)
    assert_close("k_state", state.k, state_rec.k, 1e-5)
    assert float(state.k[0, 0, 0]) == T


@pytest.mark.parametrize("T, C", [(41, 8), (23, 32)])
def test_chunk_grads_through_initial_and_final_state_match_recurrence(T, C):
    # The custom_vjp also differentiates the carried state: a loss on o and on the final state, from a non-empty
    # initial state, against autodiff through the token-by-token recurrence. F = 5 (P = 21), V = 7, H = 3.
    q, k, v, cotangent = make_inputs(14, T=T, F=5)
    rng = np.random.default_rng(15)
    kv0 = jnp.asarray(rng.standard_normal((2, 3, 21, 7), np.float32))
    k0 = jnp.asarray(np.abs(rng.standard_normal((2, 3, 21), np.float32)) + 5.0)
    w_kv = jnp.asarray(rng.standard_normal((2, 3, 21, 7), np.float32))
    w_k = jnp.asarray(rng.standard_normal((2, 3, 21), np.float32))

    def loss(attend):
        def f(q, k, v, kv0, k0):
            o, state = attend(q, k, v, initial_state=reference.BasedState(kv0, k0))
            return jnp.sum(o * cotangent) + jnp.sum(state.kv * w_kv) + jnp.sum(state.k * w_k)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(q, k, v, kv0, k0)

    value, grads = loss(functools.partial(xla.based_chunked, chunk_size=C))
    value_ref, grads_ref = loss(reference.based_recurrent)
    assert_close("loss", value, value_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv", "d_kv0", "d_k0"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-5)


def test_chunk_with_carried_state_equals_one_call():
    q, k, v, _ = make_inputs(11, T=37, F=8)
    chunked = functools.partial(xla.based_chunked, chunk_size=8)

    @jax.jit
    def split(q, k, v):
        # 13 = 8 + 5 leaves a padded chunk in the middle of the sequence; 24 = 3 * 8.
        out_a, state = chunked(q[:, :13], k[:, :13], v[:, :13])
        out_b, state = chunked(q[:, 13:], k[:, 13:], v[:, 13:], initial_state=state)
        return jnp.concatenate([out_a, out_b], axis=1), state

    out, state = split(q, k, v)
    out_full, state_full = jax.jit(chunked)(q, k, v)
    assert_close("out", out, out_full, 1e-5)
    assert_close("kv_state", state.kv, state_full.kv, 1e-5)
    assert_close("k_state", state.k, state_full.k, 1e-5)


def test_chunk_is_causal():
    q, k, v, _ = make_inputs(12, T=37, F=8)
    chunked = jax.jit(functools.partial(xla.based_chunked, chunk_size=8))
    t0 = 21
    out, _ = chunked(q, k, v)
    out2, _ = chunked(*(x.at[:, t0].add(1.0) for x in (q, k, v)))
    np.testing.assert_array_equal(np.asarray(out2[:, :t0]), np.asarray(out[:, :t0]))
    assert float(jnp.abs(out2[:, t0:] - out[:, t0:]).max()) > 1e-3


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array anywhere in a (closed) jaxpr, sub-jaxprs (scan bodies) included."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    sizes.append(_largest_intermediate(getattr(sub, "jaxpr", sub)))
    return max(sizes)


def test_chunk_never_materialises_t_by_t():
    # B = H = 1, T = 512, C = 16: a [T, T] array has 262144 elements; everything here is O(T C + T P + P V), P = 15.
    T, F, V = 512, 4, 3
    q = k = jnp.zeros((1, T, 1, F))
    v = jnp.zeros((1, T, 1, V))
    chunked = functools.partial(xla.based_chunked, chunk_size=16)
    fwd = jax.make_jaxpr(lambda q, k, v: chunked(q, k, v)[0])(q, k, v)
    bwd = jax.make_jaxpr(lambda q, k, v: jax.grad(lambda *a: chunked(*a)[0].sum(), argnums=(0, 1, 2))(q, k, v))(q, k, v)
    for name, jaxpr in (("forward", fwd), ("backward", bwd)):
        largest = _largest_intermediate(jaxpr.jaxpr)
        assert largest <= T * reference.feature_dim_expanded(F), f"{name}: an intermediate has {largest} elements"
    # The quadratic oracle does build [T, T], which shows the check can fail.
    assert _largest_intermediate(jax.make_jaxpr(reference.based_quadratic)(q, k, v).jaxpr) >= T * T


def test_bf16_inputs_accumulate_in_float32():
    q, k, v, _ = make_inputs(13, T=37, F=8)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]

    @jax.jit
    def paths(q, k, v):
        out, state = xla.based_chunked(q, k, v, chunk_size=16)
        # Same bf16 inputs through the float32 oracle: only the final rounding to bf16 differs.
        return out, state, reference.based_quadratic(*(a.astype(jnp.float32) for a in (q, k, v)))

    out, state, expected = paths(*bf)
    assert out.dtype == jnp.bfloat16 and state.kv.dtype == jnp.float32
    assert_close("bf16", out.astype(jnp.float32), expected, 1e-2)
