"""Single-needle haystack generator (token-level analogue of RULER's S-NIAH): known answer, depth, labels, data."""

import numpy as np
import pytest

from effarch.train.config import DataConfig, NiahData
from effarch.train.data import build_data
from effarch.train.data.niah import KEY, NOISE, QUERY, VAL, VOCAB_SIZE, niah_batch, niah_example


def test_known_answer():
    value = [8, 6, 7, 5, 3, 0, 9]
    x, y = niah_example(np.array([12, 20]), np.array(value), 1.0, 29)
    question = [QUERY, 12, 20, VAL, *value]  # ends with the tokens that introduced the value: the answer is a copy
    np.testing.assert_array_equal(x, [*NOISE, KEY, 12, 20, VAL, *value, *question])
    np.testing.assert_array_equal(y[21:28], value)  # the question's [VAL] predicts v1, ..., v6 predicts v7
    assert np.all(y[:21] == -100) and y[28] == -100


def test_depth_places_the_needle_after_the_preamble():
    starts = [int(np.flatnonzero(niah_example(np.array([10, 11]), np.zeros(7, int), d, 400)[0] == KEY)[0])
              for d in (0.0, 0.5, 1.0)]
    assert starts[0] == len(NOISE) and starts[0] < starts[1] < starts[2]  # depth 0 is never position 0
    assert abs((starts[1] - starts[0]) / (starts[2] - starts[0]) - 0.5) < 0.05


def test_several_queries_repeat_the_question():
    value = np.array([1, 2, 3, 4, 5, 6, 7])
    x, y = niah_example(np.array([12, 20]), value, 0.0, 120, n_queries=3)
    q = np.flatnonzero(x == QUERY)
    assert len(q) == 3 and q[-1] == 120 - 11 and (y >= 0).sum() == 21
    for start in q:  # every question is [Q] k1 k2 [VAL] value, labelled from its [VAL]
        np.testing.assert_array_equal(x[start:start + 11], [QUERY, 12, 20, VAL, *value])
        np.testing.assert_array_equal(y[start + 3:start + 10], value)
    assert np.diff(q).min() > 11  # the noise after the needle is split between the questions
    with pytest.raises(ValueError, match="n_queries"):
        niah_example(np.array([12, 20]), value, 0.0, 120, n_queries=0)


def test_batch_and_task_wiring():
    x, y = niah_batch(np.random.default_rng(0), 5, 64)
    assert x.shape == y.shape == (5, 64) and x.max() < VOCAB_SIZE
    assert np.all((y >= 0).sum(1) == 7) and np.all(x[:, 0] == NOISE[0])
    np.testing.assert_array_equal(x, niah_batch(np.random.default_rng(0), 5, 64)[0])
    train, evals = build_data(DataConfig(task="niah", seq_len=64, niah=NiahData(examples=40)), VOCAB_SIZE, 8)
    assert train.inputs.shape == (40, 64) and evals[0].name == "niah_64" and evals[0].inputs.shape == (256, 64)
    with pytest.raises(ValueError, match="the niah task needs at least 36"):
        build_data(DataConfig(task="niah", seq_len=64, niah=NiahData(examples=40)), 20, 8)
    train, _ = build_data(DataConfig(task="niah", seq_len=64, niah=NiahData(examples=40, queries=2)), VOCAB_SIZE, 8)
    assert np.all((train.labels >= 0).sum(1) == 14)
    with pytest.raises(ValueError, match="examples and queries must be >= 1"):
        NiahData(queries=0)
    with pytest.raises(ValueError, match="too short"):
        niah_example(np.array([10, 11]), np.zeros(7, int), 0.5, 20)
    with pytest.raises(ValueError, match="depth"):
        niah_example(np.array([10, 11]), np.zeros(7, int), 1.5, 100)


def test_depth_grid_includes_both_ends():
    # data.niah.depths: N evenly spaced depths, 0 and 1 included (uniform depths almost never give a needle right
    # before the question). With N = 3 every needle starts right after the preamble, halfway, or right before [Q].
    T = 64
    x, _ = niah_batch(np.random.default_rng(0), 60, T, depth_grid=3)
    starts = np.flatnonzero(x == KEY) % T
    n_noise = T - len(NOISE) - 2 * 11
    assert set(starts.tolist()) == {len(NOISE), len(NOISE) + round(n_noise / 2), T - 2 * 11}
    assert np.all(x[starts == T - 22][:, T - 11] == QUERY)  # depth 1: the question follows the needle directly
    train, _ = build_data(DataConfig(task="niah", seq_len=T, niah=NiahData(examples=60, depths=3)), VOCAB_SIZE, 8)
    np.testing.assert_array_equal(train.inputs, x)  # the data config reaches the generator
    with pytest.raises(ValueError, match="depths must be 0"):
        NiahData(depths=1)
