"""Landmark dense reference: == a literal per-query oracle; the properties the issue lists for the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.landmark import block_ids, reference
from tests.helpers.numerics import assert_close, value_and_grads
from tests.pallas_kernels.landmark.inputs import layout, literal_weights, make_inputs

weights = jax.jit(reference.landmark_weights)
attend = jax.jit(reference.landmark_attention_reference)


def test_block_ids_known_answer():
    lm = jnp.array([[False, False, True, False, True, True, False]])
    np.testing.assert_array_equal(np.asarray(block_ids(lm)), [[0, 0, 0, 1, 1, 2, 3]])


@pytest.mark.parametrize("kind, T, L", [pytest.param("aligned", 23, 5, marks=pytest.mark.slow), ("misaligned", 23, 5),
                                        pytest.param("random", 19, 0, marks=pytest.mark.slow), ("aligned", 31, 1)])
def test_weights_match_literal_oracle(kind, T, L):
    # L = 1 on T = 31 gives 15 groups: no cap on the number of blocks (the reference code's default is 16).
    q, k, _, _ = make_inputs(1, T)
    lm = layout(kind, T, L=L)
    w = weights(q, k, jnp.asarray(lm))
    assert_close("weights", w, literal_weights(q, k, lm), 1e-6)


def test_many_blocks_no_group_cap():
    # 64 blocks of one regular token: 4x the reference code's default max_groups_for_softmax.
    T = 128
    q, k, _, _ = make_inputs(2, T)
    lm = layout("aligned", T, L=1)
    w = np.asarray(weights(q, k, jnp.asarray(lm)))
    assert_close("weights", w, literal_weights(q, k, lm), 1e-6)
    # The last query still spreads weight over every earlier block.
    assert np.all(w[0, 0, -1, 0:-2:2] > 0)


@pytest.mark.parametrize("kind", ["aligned", "misaligned"])
def test_rows_sum_to_one_and_landmark_columns_are_zero(kind):
    T = 29
    q, k, _, _ = make_inputs(3, T)
    lm = layout(kind, T)
    w = np.asarray(weights(q, k, jnp.asarray(lm)))
    np.testing.assert_array_equal(w[:, :, :, lm[0]][0], 0.0)
    np.testing.assert_array_equal(w[1][:, :, lm[1]], 0.0)
    sums = w.sum(-1)
    # misaligned row 1 starts on a landmark: its block has no regular token, so query 0 sees nothing and every later
    # row keeps that landmark's share of Z without a value (the documented case); the others sum to 1.
    if kind == "misaligned":
        assert np.all(sums[1, :, 0] == 0.0) and np.all(sums[1, :, 1:] < 1.0 - 1e-4)
        sums = sums[:1]
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)
    # Causal: nothing above the diagonal.
    np.testing.assert_array_equal(np.triu(w, k=1), 0.0)


def test_empty_block_landmark_keeps_its_share():
    # [lm, a, b]: query 2 has Z = e^{S_20} + e^{S_21} + e^{S_22} and weights only on keys 1 and 2.
    q, k, _, _ = make_inputs(4, 3)
    lm = jnp.array([[True, False, False]] * 2)
    w = np.asarray(weights(q, k, lm))
    s = np.einsum("bthk,bshk->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(q.shape[-1])
    e = np.exp(s[:, :, 2])
    np.testing.assert_allclose(w[:, :, 2, 1:], e[..., 1:] / e.sum(-1, keepdims=True), rtol=1e-6)
    assert np.all(w[:, :, 2].sum(-1) < 1.0)
    np.testing.assert_array_equal(w[:, :, 0], 0.0)  # a landmark at position 0 sees nothing


def test_own_block_landmark_is_masked():
    # Changing the key of a landmark changes nothing for the queries of its own block, itself included.
    T = 17
    q, k, v, _ = make_inputs(5, T)
    lm = layout("aligned", T)  # landmarks at 5, 11
    out = attend(q, k, v, jnp.asarray(lm))
    out2 = attend(q, k.at[:, 11].mul(3.0).at[:, 11].add(1.0), v, jnp.asarray(lm))
    np.testing.assert_array_equal(np.asarray(out2[:, :12]), np.asarray(out[:, :12]))
    assert float(jnp.abs(out2[:, 12:] - out[:, 12:]).max()) > 1e-3


def test_landmark_values_never_contribute():
    T = 17
    q, k, v, _ = make_inputs(6, T)
    lm = layout("misaligned", T)
    v2 = jnp.where(jnp.asarray(lm)[..., None, None], 100.0, v)
    np.testing.assert_array_equal(
        np.asarray(attend(q, k, v2, jnp.asarray(lm))),
        np.asarray(attend(q, k, v, jnp.asarray(lm))),
    )


def test_no_landmarks_is_causal_softmax_attention():
    T = 21
    q, k, v, _ = make_inputs(7, T)
    out = attend(q, k, v[..., :5], jnp.zeros((2, T), bool))
    softmax = jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")
    assert_close("out", out, softmax(q, k, v[..., :5], is_causal=True), 1e-6)


def test_nothing_to_attend_gives_zero_and_finite_gradients():
    q, k, v, cot = make_inputs(8, 6)
    lm = jnp.array([[True, True, False, False, True, True]] * 2)
    fn = lambda q, k, v: reference.landmark_attention_reference(q, k, v, lm)  # noqa: E731
    out, grads = jax.jit(lambda *a: value_and_grads(fn, a, cot))(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[:, :2]), 0.0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
