"""BASED oracles: Taylor feature map identity, quadratic form == token-by-token recurrence, causality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.based import reference
from tests.helpers.numerics import assert_close, value_and_grads

B, H, V = 2, 3, 7


def make_inputs(seed, *, T, F):
    # numpy draws: no per-shape compilation of random kernels.
    rng = np.random.default_rng(seed)
    shapes = ((B, T, H, F), (B, T, H, F), (B, T, H, V), (B, T, H, V))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes)


def full_square_feature_map(x):
    """based's `TaylorExp`: [1, x / F^(1/4), vec(x outer x) / (sqrt(2) sqrt(F))], all F^2 products (P = 1 + F + F^2)."""
    f = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / f**0.25, outer / (math.sqrt(2.0) * math.sqrt(f))], axis=-1)


@pytest.mark.parametrize("F", [8, 16])
def test_taylor_feature_map_identity(F):
    q, k, _, _ = make_inputs(0, T=11, F=F)
    phi_q, phi_k = reference.taylor_feature_map(q), reference.taylor_feature_map(k)
    assert phi_q.shape == (B, 11, H, 1 + F + F * (F + 1) // 2)
    s = jnp.einsum("BTHF,BSHF->BHTS", q, k) / math.sqrt(F)
    assert_close("phi(q).phi(k)", jnp.einsum("BTHP,BSHP->BHTS", phi_q, phi_k), 1 + s + s**2 / 2, 1e-6)


@pytest.mark.parametrize("F", [5, 16])
def test_symmetric_features_match_the_full_square_map_with_gradients(F):
    # The F(F+1)/2 products give the same kernel, and the same decode outputs and gradients, as all F^2 of them.
    q, k, v, cotangent = make_inputs(5, T=19, F=F)

    def decode_with(feature_map):
        def attend(q, k, v):
            phi_q, phi_k = feature_map(q), feature_map(k)
            kv = jnp.cumsum(jnp.einsum("BTHP,BTHV->BTHPV", phi_k, v), axis=1)
            z = jnp.cumsum(phi_k, axis=1)
            den = jnp.einsum("BTHP,BTHP->BTH", phi_q, z)
            return jnp.einsum("BTHP,BTHPV->BTHV", phi_q, kv) / (den[..., None] + 1e-6)

        return value_and_grads(attend, (q, k, v), cotangent)

    out, grads = jax.jit(lambda: decode_with(reference.taylor_feature_map))()
    out_full, grads_full = jax.jit(lambda: decode_with(full_square_feature_map))()
    assert_close("out", out, out_full, 1e-5)
    for name, g, g_full in zip(("dq", "dk", "dv"), grads, grads_full):
        assert_close(name, g, g_full, 1e-5)
    assert_close("out vs quadratic", out, reference.based_quadratic(q, k, v), 1e-5)
    p_full = full_square_feature_map(q).shape[-1]
    assert reference.taylor_feature_map(q).shape[-1] == reference.feature_dim_expanded(F) < p_full == 1 + F + F * F


def test_taylor_feature_map_known_values():
    # F = 4, x = (2, 0, 0, -1): [1, x / 4^(1/4), (c_ij x_i x_j for i <= j) / (sqrt(2) * 2)], c_ii = 1, c_ij = sqrt(2).
    x = jnp.array([2.0, 0.0, 0.0, -1.0])
    phi = np.asarray(reference.taylor_feature_map(x))
    assert phi.shape == (15,)
    assert phi[0] == 1.0
    np.testing.assert_allclose(phi[1:5], [math.sqrt(2), 0, 0, -1 / math.sqrt(2)], rtol=1e-6)
    # Pairs in row-major order: (0,0) (0,1) (0,2) (0,3) (1,1) (1,2) (1,3) (2,2) (2,3) (3,3).
    square = np.array([4, 0, 0, -2 * math.sqrt(2), 0, 0, 0, 0, 0, 1]) / (2 * math.sqrt(2))
    np.testing.assert_allclose(phi[5:], square, rtol=1e-6, atol=1e-7)
    assert reference.feature_dim_expanded(16) == 153 and reference.feature_dim_expanded(4) == 15


def test_taylor_kernel_is_at_least_one_half():
    s = jnp.linspace(-5.0, 5.0, 101)
    assert float(reference.taylor_kernel(s).min()) == pytest.approx(0.5)


def numpy_based(q, k, v, eps):
    """The definition, looping over (b, h, t) in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(v.shape)
    f = q.shape[-1]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for t in range(q.shape[1]):
                s = k[b, : t + 1, h] @ q[b, t, h] / math.sqrt(f)
                w = 1 + s + s**2 / 2
                out[b, t, h] = w @ v[b, : t + 1, h] / (w.sum() + eps)
    return out


def test_quadratic_matches_numpy_loop():
    q, k, v, _ = make_inputs(1, T=13, F=8)
    assert_close("quadratic", reference.based_quadratic(q, k, v, eps=1e-6), numpy_based(q, k, v, 1e-6), 1e-6)


def test_recurrent_continues_from_state_and_matches_quadratic():
    # The T-grid (37, 64, 100) x F (8, 16) of recurrent == quadratic == chunked, with final states, is in test_xla.py.
    q, k, v, _ = make_inputs(2, T=37, F=8)

    @jax.jit
    def paths(q, k, v):
        out_a, mid = reference.based_recurrent(q[:, :20], k[:, :20], v[:, :20])
        out_b, _ = reference.based_recurrent(q[:, 20:], k[:, 20:], v[:, 20:], initial_state=mid)
        return reference.based_quadratic(q, k, v), jnp.concatenate([out_a, out_b], axis=1), mid

    out_ref, out_split, mid = paths(q, k, v)
    assert_close("split", out_split, out_ref, 1e-5)
    # The state is the plain sum over the tokens seen.
    phi_k = reference.taylor_feature_map(k[:, :20])
    assert_close("kv_state", mid.kv, jnp.einsum("BTHP,BTHV->BHPV", phi_k, v[:, :20]), 1e-5)
    assert_close("k_state", mid.k, jnp.einsum("BTHP->BHP", phi_k), 1e-5)


def test_quadratic_is_causal():
    q, k, v, _ = make_inputs(4, T=23, F=8)
    t0 = 15
    quadratic = jax.jit(reference.based_quadratic)
    out = quadratic(q, k, v)
    out2 = quadratic(*(x.at[:, t0].add(1.0) for x in (q, k, v)))
    np.testing.assert_array_equal(np.asarray(out2[:, :t0]), np.asarray(out[:, :t0]))
    assert float(jnp.abs(out2[:, t0] - out[:, t0]).max()) > 1e-3
