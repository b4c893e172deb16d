"""Train stream and data assembly: batches addressed by step, padding of mixed lengths, the Zoology mixture."""

import numpy as np
import pytest

from effarch.train.config import DataConfig, MqarData
from effarch.train.data import TrainStream, build_data, mqar, mqar_segments
from effarch.train.data.text import byte_lm_examples


def test_batches_are_a_function_of_the_step():
    x = np.arange(50)[:, None] * np.ones((1, 3), int)
    stream = TrainStream(x, x, batch_size=8, seed=0)
    assert stream.steps_per_epoch == 6
    a = [stream.batch(s)[0][:, 0] for s in range(13)]
    fresh = TrainStream(x, x, batch_size=8, seed=0)
    b = [fresh.batch(s)[0][:, 0] for s in reversed(range(13))][::-1]  # any access order
    for u, w in zip(a, b):
        np.testing.assert_array_equal(u, w)
    epoch0 = np.concatenate(a[:6])
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert not np.array_equal(epoch0, np.concatenate(a[6:12]))  # reshuffled per epoch
    np.testing.assert_array_equal(stream.batch(3, slice(2, 5))[0], stream.batch(3)[0][2:5])  # a process's rows


def test_mixed_lengths_are_right_padded():
    cfg = DataConfig(mqar=MqarData(train_segments=((16, 2, 40), (32, 4, 40)), test_segments=((16, 2, 10), (32, 4, 10))))
    stream, evals = build_data(cfg, vocab_size=64, batch_size=8)
    assert stream.inputs.shape == (80, 32)
    short = stream.labels[:40]
    assert (short[:, 16:] == -100).all() and (stream.inputs[:40, 16:] == 0).all()
    assert ((short != -100).sum(1) == 2).all()
    assert [e.inputs.shape for e in evals] == [(10, 16), (10, 32)]
    assert [e.name for e in evals] == ["mqar_N16_D2", "mqar_N32_D4"]


def test_zoology_standard_mixture():
    train, test = mqar_segments(DataConfig(mqar=MqarData(mixture="zoology_standard")))
    assert train == mqar.TRAIN_SEGMENTS
    assert test == tuple((n, d, 1000) for n, d in mqar.TEST_SEGMENTS)


def test_byte_lm_windows(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(1, 101)))  # no NUL byte: a file with one is refused as binary
    x, y, vx, vy = byte_lm_examples(str(tmp_path / "*.txt"), seq_len=9, max_bytes=10_000, val_fraction=0.2)
    assert x.shape == (9, 9) and vx.shape == (2, 9)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # next-byte targets
    np.testing.assert_array_equal(x[1], np.arange(10, 19))
    with pytest.raises(FileNotFoundError, match="no files match"):
        byte_lm_examples(str(tmp_path / "*.md"), 9, 100, 0.1)


def test_generator_options_reach_every_segment():
    cfg = DataConfig(mqar=MqarData(train_segments=((16, 2, 20),), test_segments=((16, 2, 10),),
                                   random_non_queries=False, power_a=0.5))
    stream, (test,) = build_data(cfg, vocab_size=64, batch_size=4)
    want_x, want_y = mqar.multiquery_ar(64, 16, 2, 20, power_a=0.5, random_non_queries=False, seed=0)
    np.testing.assert_array_equal(stream.inputs, want_x)
    np.testing.assert_array_equal(stream.labels, want_y)
    want_test, _ = mqar.multiquery_ar(64, 16, 2, 10, power_a=0.5, random_non_queries=False, seed=1000)
    np.testing.assert_array_equal(test.inputs, want_test)
