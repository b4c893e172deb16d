"""Sliding-window chunked XLA form == the dense oracle (values and gradients); O(T * window) memory; causality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.sliding_window import reference, xla
from tests.helpers.numerics import assert_close, value_and_grads
from tests.pallas_kernels.based.test_xla import _largest_intermediate
from tests.pallas_kernels.sliding_window.test_reference import H, check_window_convention, make_inputs

CASES = [
    # (T, Hkv, window): T not a multiple of the window, a window larger than T, GQA and MQA. (window = 1, where
    # dq = dk = 0 exactly, is covered by test_chunk_window_convention.)
    (37, 2, 16),
    (64, 6, 16),
    (100, 1, 7),
    (37, 3, 64),
    (11, 2, 2),
]


@pytest.mark.parametrize("T, Hkv, window", CASES)
def test_chunk_fwd_bwd_matches_reference(T, Hkv, window):
    q, k, v, cotangent = make_inputs(2, T=T, Hkv=Hkv)

    @jax.jit
    def paths(q, k, v, cotangent):
        chunked = functools.partial(xla.sliding_window_chunked, window=window)
        dense = functools.partial(reference.sliding_window_reference, window=window)
        return value_and_grads(chunked, (q, k, v), cotangent), value_and_grads(dense, (q, k, v), cotangent)

    (out, grads), (out_ref, grads_ref) = paths(q, k, v, cotangent)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-4)


@pytest.mark.parametrize("window", [1, 4, 5])
def test_chunk_window_convention(window):
    # T = 13 with windows 4 and 5: several chunks, the last one padded.
    check_window_convention(jax.jit(functools.partial(xla.sliding_window_chunked, window=window)), 13, window)


def test_chunk_is_causal():
    q, k, v, _ = make_inputs(3, T=37, Hkv=2)
    attend = jax.jit(functools.partial(xla.sliding_window_chunked, window=8))
    t0 = 21
    out = attend(q, k, v)
    out2 = attend(*(x.at[:, t0].add(1.0) for x in (q, k, v)))
    np.testing.assert_array_equal(np.asarray(out2[:, :t0]), np.asarray(out[:, :t0]))
    # Token t0 reaches exactly the queries t0 .. t0 + 7.
    changed = np.asarray(jnp.abs(out2 - out).max(axis=(0, 2, 3))) > 0
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(t0, t0 + 8))


def test_chunk_memory_is_linear_in_t():
    # B = 1, H = 6, T = 512, window = 8: a [H, T, T] score array has 1.5M elements; the chunked blocks have H T 2w.
    T, window = 512, 8
    q = jnp.zeros((1, T, H, 4))
    k = v = jnp.zeros((1, T, 2, 4))
    attend = functools.partial(xla.sliding_window_chunked, window=window)
    fwd = jax.make_jaxpr(attend)(q, k, v)
    bwd = jax.make_jaxpr(lambda *a: jax.grad(lambda *b: attend(*b).sum(), argnums=(0, 1, 2))(*a))(q, k, v)
    for name, jaxpr in (("forward", fwd), ("backward", bwd)):
        largest = _largest_intermediate(jaxpr.jaxpr)
        assert largest <= H * T * 2 * window, f"{name}: an intermediate has {largest} elements"
    dense = jax.make_jaxpr(functools.partial(reference.sliding_window_reference, window=window))(q, k, v)
    assert _largest_intermediate(dense.jaxpr) >= H * T * T
