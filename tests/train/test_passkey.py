"""Passkey generator (token-level analogue of the landmark paper's passkey retrieval): answer, depth, labels."""

import numpy as np
import pytest

from effarch.train.data import passkey
from effarch.train.data.passkey import KEY_LEN, LANDMARK, PK_CLOSE, PK_OPEN, QUERY, passkey_batch, passkey_example


def test_known_answer_without_landmarks():
    x, y, q = passkey_example(np.array([3, 1, 4, 1, 5]), 1.0, 26)
    key = [3, 1, 4, 1, 5]
    preamble = [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(x, [*preamble, 10, 11, 12, 13, 14, 10, 11, PK_OPEN, *key, PK_CLOSE, QUERY, PK_OPEN,
                                      *key])
    np.testing.assert_array_equal(y[20:25], [3, 1, 4, 1, 5])
    assert np.all(y[:20] == -100) and y[25] == -100 and q == 20
    x0, _, _ = passkey_example(np.array([3, 1, 4, 1, 5]), 0.0, 26)
    np.testing.assert_array_equal(x0[:6], [*preamble, PK_OPEN])  # depth 0: right after the preamble


@pytest.mark.parametrize("seq_len, L", [(512, 15), (96, 5), (2048, 50)])
def test_landmark_layout_and_labels(seq_len, L):
    x, y, q = passkey_example(np.array([9, 0, 9, 0, 7]), 0.3, seq_len, L)
    assert x.shape == y.shape == (seq_len,)
    np.testing.assert_array_equal(x == LANDMARK, np.arange(seq_len) % (L + 1) == L)
    assert x[q] == PK_OPEN and x[q - 1 - (x[q - 1] == LANDMARK)] == QUERY
    # The five labels are the key, in order, and never sit on a landmark input.
    labelled = np.flatnonzero(y >= 0)
    assert len(labelled) == KEY_LEN and not np.any(x[labelled] == LANDMARK)
    np.testing.assert_array_equal(y[labelled], [9, 0, 9, 0, 7])
    # Every regular input after the question is the answer digit its predecessor's label named.
    regular = labelled[1:]
    np.testing.assert_array_equal(x[np.flatnonzero((x != LANDMARK) & (np.arange(seq_len) > q))][:4], y[labelled][:4])
    assert len(regular) == KEY_LEN - 1


def test_several_questions_each_labelled():
    key = np.array([2, 7, 1, 8, 2])
    x, y, q = passkey_example(key, 0.2, 160, 7, n_queries=3)
    labelled = np.flatnonzero(y >= 0)
    np.testing.assert_array_equal(y[labelled], np.tile(key, 3))
    assert x[q] == PK_OPEN and np.sum(x == QUERY) == 3 and np.sum(x == PK_OPEN) == 4
    # Each question's answer is fed in after it: every labelled digit is the next regular input.
    regular = np.flatnonzero(x != LANDMARK)
    nxt = {int(p): int(regular[i + 1]) for i, p in enumerate(regular[:-1])}
    np.testing.assert_array_equal(x[[nxt[int(p)] for p in labelled]], y[labelled])
    with pytest.raises(ValueError, match="n_queries"):
        passkey_example(key, 0.2, 160, 7, n_queries=0)


def test_depth_places_the_key():
    starts = []
    for depth in (0.0, 0.5, 1.0):
        x, _, q = passkey_example(np.zeros(5, int), depth, 400, 15)
        starts.append(int(np.flatnonzero(x == PK_OPEN)[0]))
    assert starts[0] == 5 and starts[0] < starts[1] < starts[2] < q
    assert abs((starts[1] - 5) / (starts[2] - 5) - 0.5) < 0.05


def test_batch_is_deterministic_and_bad_input_raises():
    a = passkey_batch(np.random.default_rng(0), 6, 128, 15)
    b = passkey_batch(np.random.default_rng(0), 6, 128, 15)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="too short"):
        passkey_example(np.zeros(5, int), 0.5, 10)
    with pytest.raises(ValueError, match="depth"):
        passkey_example(np.zeros(5, int), 1.5, 100)
    assert passkey.raw_length(512, 15) == 480
