"""Single-needle haystack generator (token-level S-NIAH analogue, specs §7.3): known answer, depth, labels, data."""

import numpy as np
import pytest

from effarch.train.config import DataConfig
from effarch.train.data import build_data
from effarch.train.data.niah import KEY, NOISE, QUERY, VAL, VOCAB_SIZE, niah_batch, niah_example


def test_known_answer():
    value = [8, 6, 7, 5, 3, 0, 9]
    x, y = niah_example(np.array([12, 20]), np.array(value), 1.0, 26)
    np.testing.assert_array_equal(x, [26, 27, 28, 29, 30, KEY, 12, 20, VAL, *value, QUERY, 12, 20, *value])
    np.testing.assert_array_equal(y[18:25], value)  # k2 of the question predicts v1, ..., v6 predicts v7
    assert np.all(y[:18] == -100) and y[25] == -100


def test_depth_places_the_needle():
    starts = [int(np.flatnonzero(niah_example(np.array([10, 11]), np.zeros(7, int), d, 400)[0] == KEY)[0])
              for d in (0.0, 0.5, 1.0)]
    assert starts[0] == 0 and starts[0] < starts[1] < starts[2]
    assert abs(starts[1] / starts[2] - 0.5) < 0.05


def test_batch_and_task_wiring():
    x, y = niah_batch(np.random.default_rng(0), 5, 64)
    assert x.shape == y.shape == (5, 64) and x.max() < VOCAB_SIZE
    assert np.all((y >= 0).sum(1) == 7) and np.all(np.isin(x[:, 0], [KEY, *NOISE]))
    np.testing.assert_array_equal(x, niah_batch(np.random.default_rng(0), 5, 64)[0])
    train, evals = build_data(DataConfig(task="niah", seq_len=64, niah_examples=40), VOCAB_SIZE, 8)
    assert train.inputs.shape == (40, 64) and evals[0].name == "niah_64" and evals[0].inputs.shape == (256, 64)
    with pytest.raises(ValueError, match="the niah task needs at least 36"):
        build_data(DataConfig(task="niah", seq_len=64, niah_examples=40), 20, 8)
    with pytest.raises(ValueError, match="too short"):
        niah_example(np.array([10, 11]), np.zeros(7, int), 0.5, 20)
    with pytest.raises(ValueError, match="depth"):
        niah_example(np.array([10, 11]), np.zeros(7, int), 1.5, 100)
