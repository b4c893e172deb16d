"""Sliding-window oracle: the window convention (exactly `window` keys), a numpy loop, GQA == repeated KV heads."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.sliding_window import reference
from tests.helpers.numerics import assert_close

B, H, K = 2, 6, 8


def make_inputs(seed, *, T, Hkv, V=K):
    # numpy draws: no per-shape compilation of random kernels.
    rng = np.random.default_rng(seed)
    shapes = ((B, T, H, K), (B, T, Hkv, K), (B, T, Hkv, V), (B, T, H, V))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes)


def one_hot_inputs(T, Hkv=1):
    """q = 0 makes every visible key equally likely; v_j = e_j marks which keys were seen.

    Then o[t, j] = 1 / n_t for each visible j (n_t of them) and 0 elsewhere. Head dim = value dim = T, which
    jax.nn.dot_product_attention requires.
    """
    q = jnp.zeros((1, T, H, T))
    k = jnp.zeros((1, T, Hkv, T))
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, Hkv, T))
    return q, k, v


def expected_one_hot(T, window):
    """Our convention: query t sees keys t - window < j <= t, i.e. exactly min(t + 1, window) keys."""
    out = np.zeros((T, T))
    for t in range(T):
        keys = [j for j in range(T) if t - window < j <= t]
        out[t, keys] = 1.0 / len(keys)
    return out


def check_window_convention(attend, T, window):
    """`attend(q, k, v)` must see exactly `window` keys: the one-hot pattern tells w from w + 1 or w // 2 + 1."""
    out = np.asarray(attend(*one_hot_inputs(T)))
    for h in range(H):
        np.testing.assert_allclose(out[0, :, h], expected_one_hot(T, window), atol=1e-6)
    seen = (out[0, :, 0] > 0).sum(axis=-1)
    np.testing.assert_array_equal(seen, np.minimum(np.arange(T) + 1, window))
    # The pattern tells ours apart from zoology's SlidingAttn(block_size=w) (w + 1 keys) and based's window_size=w
    # (flash-attn window (w // 2, 0): w // 2 + 1 keys).
    for other in {window + 1, window // 2 + 1} - {window}:
        assert not np.allclose(out[0, :, 0], expected_one_hot(T, other), atol=1e-6)


@pytest.mark.parametrize("window", [1, 4, 7])
def test_reference_window_convention(window):
    check_window_convention(lambda q, k, v: reference.sliding_window_reference(q, k, v, window=window), 13, window)


def test_window_mask_known_values():
    mask = np.asarray(reference.window_mask(jnp.arange(5), jnp.arange(5), 2))
    expected = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=bool
    )
    np.testing.assert_array_equal(mask, expected)


def numpy_sliding_window(q, k, v, window):
    """Loop over (b, h, t) in float64; query head h reads kv head h // (H // Hkv)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for t in range(q.shape[1]):
                keys = np.arange(max(0, t - window + 1), t + 1)
                logits = k[b, keys, h // group] @ q[b, t, h] / math.sqrt(q.shape[-1])
                p = np.exp(logits - logits.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, h // group]
    return out


@pytest.mark.parametrize("Hkv", [6, 2])
def test_reference_matches_numpy_loop(Hkv):
    q, k, v, _ = make_inputs(0, T=11, Hkv=Hkv, V=5)
    out = jax.jit(lambda q, k, v: reference.sliding_window_reference(q, k, v, window=4))(q, k, v)
    assert_close("reference", out, numpy_sliding_window(q, k, v, 4), 1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v, _ = make_inputs(1, T=11, Hkv=2)
    attend = jax.jit(lambda q, k, v: reference.sliding_window_reference(q, k, v, window=4))
    repeat = lambda x: jnp.repeat(x, H // 2, axis=2)  # noqa: E731
    assert_close("gqa", attend(q, k, v), attend(q, repeat(k), repeat(v)), 1e-6)
