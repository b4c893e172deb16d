"""Landmark blockwise XLA form == dense reference (values and gradients), empty rows, O(T C) memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.landmark import reference, xla
from tests.helpers.numerics import assert_close, value_and_grads
from tests.pallas_kernels.landmark.inputs import layout, make_inputs

CASES = [
    # (layout, T, L, tile): T never a multiple of the tile; tiles cut blocks in the middle, hold several landmarks
    # (L = 2 with tile 16), or are shorter than a block (tile 4 < L + 1 = 6), so groups span tiles.
    pytest.param("aligned", 37, 5, 8, marks=pytest.mark.slow),
    ("misaligned", 53, 5, 4),
    ("random", 41, 0, 16),
    pytest.param("aligned", 29, 2, 64, marks=pytest.mark.slow),
    pytest.param("none", 23, 0, 8, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind, T, L, C", CASES)
def test_blockwise_fwd_bwd_matches_reference(kind, T, L, C):
    q, k, v, cot = make_inputs(10, T)
    lm = jnp.asarray(layout(kind, T, L=L, seed=T))
    blockwise = functools.partial(xla.landmark_attention_xla, block_size=C)

    @jax.jit
    def paths(q, k, v):
        out, grads = value_and_grads(lambda q, k, v: blockwise(q, k, v, lm), (q, k, v), cot)
        out_ref, grads_ref = value_and_grads(lambda q, k, v: reference.landmark_attention_reference(q, k, v, lm),
                                             (q, k, v), cot)
        return out, grads, out_ref, grads_ref

    out, grads, out_ref, grads_ref = paths(q, k, v)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-5)


def test_empty_rows_and_groups_give_zero_and_finite_gradients():
    # Landmarks at 0 and 1, then one at the last position of a tile (3) and at a tile's first position (4):
    # empty groups, empty rows and groups that close exactly on tile edges.
    q, k, v, cot = make_inputs(11, 10)
    lm = jnp.array([[True, True, False, True, True, False, False, True, False, False]] * 2)
    blockwise = functools.partial(xla.landmark_attention_xla, block_size=4)

    @jax.jit
    def paths(q, k, v):
        out, grads = value_and_grads(lambda q, k, v: blockwise(q, k, v, lm), (q, k, v), cot)
        out_ref = reference.landmark_attention_reference(q, k, v, lm)
        return out, grads, out_ref

    out, grads, out_ref = paths(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[:, 0]), 0.0)
    assert_close("out", out, out_ref, 1e-5)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.slow
def test_large_scores_do_not_overflow():
    # Scores of a few hundred: exp without the running maxima would overflow float32.
    q, k, v, _ = make_inputs(12, 29)
    q, k = 12.0 * q, 12.0 * k
    lm = jnp.asarray(layout("misaligned", 29))
    out = jax.jit(functools.partial(xla.landmark_attention_xla, block_size=8))(q, k, v, lm)
    assert_close("out", out, jax.jit(reference.landmark_attention_reference)(q, k, v, lm), 1e-5)


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


def test_blockwise_never_materialises_t_by_t():
    # B = H = 1, T = 512, C = 16: [T, T] has 262144 elements; one tile pair of scores has C * C = 256.
    T, C, Kd, Vd = 512, 16, 4, 3
    q = k = jnp.zeros((1, T, 1, Kd))
    v = jnp.zeros((1, T, 1, Vd))
    lm = jnp.asarray((np.arange(T) % 6 == 5)[None])
    fn = functools.partial(xla.landmark_attention_xla, block_size=C)
    fwd = jax.make_jaxpr(lambda q, k, v: fn(q, k, v, lm))(q, k, v)
    bwd = jax.make_jaxpr(lambda q, k, v: jax.grad(lambda *a: fn(*a, lm).sum(), argnums=(0, 1, 2))(q, k, v))(q, k, v)
    for name, jaxpr in (("forward", fwd), ("backward", bwd)):
        largest = _largest_intermediate(jaxpr.jaxpr)
        # Per tile: scores [C, C] and per-segment stats [C, C]; the backward stores one query tile's carries,
        # [T / C, C, V] = T * V; the inputs are T * K.
        assert largest <= max(C * C, T * max(Kd, Vd)), f"{name}: an intermediate has {largest} elements"
    assert _largest_intermediate(jax.make_jaxpr(reference.landmark_attention_reference)(q, k, v, lm).jaxpr) >= T * T


@pytest.mark.slow
def test_bf16_inputs_accumulate_in_float32():
    q, k, v, _ = make_inputs(13, 37)
    lm = jnp.asarray(layout("aligned", 37))
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = jax.jit(functools.partial(xla.landmark_attention_xla, block_size=8))(*bf, lm)
    expected = jax.jit(reference.landmark_attention_reference)(*(a.astype(jnp.float32) for a in bf), lm)
    assert out.dtype == jnp.bfloat16
    # Same bf16 inputs through the float32 oracle: only the final rounding to bf16 differs (2^-8 relative).
    assert_close("bf16", out.astype(jnp.float32), expected, 1e-2)
