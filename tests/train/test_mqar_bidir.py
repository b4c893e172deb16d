"""Bidirectional MQAR (train/data/mqar_bidir.py, task "mqar_bidir"): every label is at a MASK and is the value
paired with the key before it, the layout is random slots (queries before their pair about half of the time),
the stream is a function of the seed, and bad settings fail in one line."""

import numpy as np
import pytest

from effarch.train.config import ConfigError, DataConfig, MqarBidirData, load_config
from effarch.train.data import build_data
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.data.mqar_bidir import MASK, bidirectional_mqar


def test_labels_are_the_values_of_the_masked_queries():
    V, N, D = 64, 40, 5
    x, y = bidirectional_mqar(V, N, D, 50, seed=3)
    assert x.shape == y.shape == (50, N) and x.dtype == y.dtype == np.int32
    before = []
    for row_x, row_y in zip(x, y):
        slots = row_x.reshape(-1, 2)
        pairs = {int(k): int(v) for k, v in slots if 1 <= k < V // 2 and v != MASK}
        queries = [int(k) for k, v in slots if v == MASK]
        assert len(pairs) == D and sorted(queries) == sorted(pairs)  # D distinct keys, each asked once
        assert ((slots[:, 0] < V // 2) == np.isin(slots[:, 0], list(pairs))).all()  # no filler is a key
        labelled = np.flatnonzero(row_y != IGNORE_LABEL)
        assert len(labelled) == D and (row_x[labelled] == MASK).all()
        for t in labelled:
            assert row_y[t] == pairs[int(row_x[t - 1])]
            before.append(t < 2 * np.flatnonzero((slots[:, 0] == row_x[t - 1]) & (slots[:, 1] != MASK))[0])
    assert 0.4 < np.mean(before) < 0.6  # a causal model could answer only the queries after their pair


def test_the_examples_are_a_function_of_the_seed():
    a, b, c = (bidirectional_mqar(32, 16, 2, 4, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("args, message", [
    ((64, 15, 2, 4), "seq_len must be even"),
    ((64, 12, 4, 4), r"4 \* num_kv_pairs <= seq_len"),
    ((8, 40, 4, 4), "vocab_size=8 has 3 keys, fewer than num_kv_pairs=4"),
    ((64, 16, 0, 4), "num_kv_pairs must be >= 1"),
])
def test_bad_arguments_fail_in_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        bidirectional_mqar(*args)


def test_build_data_and_config_checks():
    cfg = DataConfig(task="mqar_bidir", seq_len=16, mqar_bidir=MqarBidirData(num_kv_pairs=3, examples=40,
                                                                              test_examples=10))
    stream, evals = build_data(cfg, vocab_size=32, batch_size=8)
    assert stream.inputs.shape == (40, 16) and stream.max_labels_per_example == 3
    assert [e.name for e in evals] == ["mqar_bidir_N16_D3"] and evals[0].inputs.shape == (10, 16)
    assert not np.array_equal(evals[0].inputs, stream.inputs[:10])  # test data from seed + 1000
    with pytest.raises(ValueError, match="model.vocab_size=6: the mqar_bidir task needs more than"):
        build_data(cfg, vocab_size=6, batch_size=8)
    for overrides, message in [(["data.seq_len=10"], "data: mqar_bidir.num_kv_pairs=3 needs seq_len >= 4 x it"),
                               (["data.seq_len=13", "data.mqar_bidir.num_kv_pairs=2"], "data: seq_len=13 must be even"),
                               (["data.mqar_bidir.examples=0"], "data.mqar_bidir: examples must be >= 1")]:
        with pytest.raises(ConfigError) as e:
            load_config([], ["data.task=mqar_bidir", "data.mqar_bidir.num_kv_pairs=3", *overrides])
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
