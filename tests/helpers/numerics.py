"""Comparison helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: float32 error grows with the output's magnitude."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


def assert_close(name: str, actual, expected, rtol: float):
    """Fails with the relative error when it exceeds `rtol` (relative to the max magnitude of `expected`)."""
    assert np.shape(actual) == np.shape(expected), f"{name}: shape {np.shape(actual)} != {np.shape(expected)}"
    assert np.all(np.isfinite(np.asarray(actual))), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


def value_and_grads(fn, args, cotangent):
    """Output of fn(*args) and the gradients of <fn(*args), cotangent> w.r.t. every arg."""
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent.astype(out.dtype))


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)
