"""Tests for the MQAR generator (train/data/mqar.py; Zoology, Arora et al. 2023)."""

import numpy as np
import pytest

from effarch.train.data.mqar import (
    TEST_NUM_EXAMPLES,
    TEST_SEGMENTS,
    TRAIN_SEGMENTS,
    VOCAB_SIZE,
    make_mixture,
    multiquery_ar,
)

X = -100


def test_multiquery_ar_matches_zoology_known_answer():
    # Checked against HazyResearch/zoology's multiquery_ar (V=32, N=16, D=2, seed 0).
    inputs, labels = multiquery_ar(32, 16, 2, 2, random_non_queries=False, seed=0)
    np.testing.assert_array_equal(
        inputs, [[2, 20, 7, 28, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 7, 0], [3, 29, 5, 22, 5, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        labels, [[X] * 8 + [20] + [X] * 5 + [28, X], [X] * 4 + [22] + [X] * 3 + [29] + [X] * 7]
    )


def test_multiquery_ar_matches_zoology_when_every_slot_is_a_query():
    # N=128, D=32: 32 gaps out of 32 slots, so the gap sampler always needs several rounds (the path the tiny sample
    # above may not reach) and V=8192 exercises the full 4095-token key pool. Expected values were produced by the
    # numpy calls of zoology@d88d6f5 multiquery_ar (run verbatim, torch filler left out) under numpy 2.5; the legacy
    # RandomState stream is frozen across numpy versions (NEP 19).
    inputs, labels = multiquery_ar(8192, 128, 32, 3, random_non_queries=False, seed=1)
    np.testing.assert_array_equal(inputs[0, :8], [3962, 7876, 3000, 7596, 3919, 4866, 3654, 4960])
    np.testing.assert_array_equal(inputs[2, :8], [684, 5949, 3267, 5986, 2809, 7775, 3649, 5472])
    # Which key (index into the context) is queried at each of the 32 query slots, row by row.
    expected_order = [
        "0 6 3 2 10 27 20 28 17 25 8 1 22 5 16 29 18 9 11 12 7 14 4 24 19 26 15 13 23 31 30 21",
        "8 1 7 4 14 17 2 13 10 3 5 9 0 16 12 24 6 18 23 15 21 20 22 25 11 27 31 19 30 28 26 29",
        "2 0 10 1 4 11 20 16 6 19 7 21 13 24 14 28 29 8 22 12 27 26 18 31 23 3 5 15 30 17 9 25",
    ]
    expected_order = [[int(i) for i in row.split()] for row in expected_order]
    for b in range(3):
        keys = inputs[b, 0:64:2].tolist()
        assert [keys.index(t) for t in inputs[b, 64::2].tolist()] == expected_order[b]
        np.testing.assert_array_equal(labels[b, 64::2], inputs[b, 1:64:2][expected_order[b]])


def test_multiquery_ar_random_filler_known_answer():
    # Recorded from this implementation after the property tests passed; guards against silent changes of the stream.
    # V=29: keys in [1, 14), values in [14, 29); the query region starts at 2D = 6. Row 2 shows a filler token (3 at
    # position 11) that collides with a key: an unlabelled distractor, as in Zoology.
    inputs, labels = multiquery_ar(29, 14, 3, 2, seed=7)
    np.testing.assert_array_equal(
        inputs, [[9, 23, 11, 15, 3, 18, 3, 27, 9, 19, 27, 4, 11, 1], [2, 26, 6, 16, 3, 27, 2, 18, 3, 21, 23, 3, 6, 26]]
    )
    np.testing.assert_array_equal(
        labels, [[X] * 6 + [18, X, 23, X, X, X, 15, X], [X] * 6 + [26, X, 27, X, X, X, 16, X]]
    )
    plain, plain_labels = multiquery_ar(29, 14, 3, 2, random_non_queries=False, seed=7)
    np.testing.assert_array_equal(plain_labels, labels)
    np.testing.assert_array_equal(np.where(plain == 0, inputs, plain), inputs)


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_multiquery_ar_properties(random_non_queries):
    V, N, D, B = 8192, 256, 16, 200
    inputs, labels = multiquery_ar(V, N, D, B, random_non_queries=random_non_queries, seed=3)
    assert inputs.shape == labels.shape == (B, N)
    assert np.issubdtype(inputs.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)
    keys, values = inputs[:, 0 : 2 * D : 2], inputs[:, 1 : 2 * D : 2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row)) == D for row in keys.tolist())
    assert all(len(set(row)) == D for row in values.tolist())
    # The context carries no labels; queries sit at even offsets of the query region.
    assert (labels[:, : 2 * D] == X).all()
    assert (labels[:, 2 * D + 1 :: 2] == X).all()
    assert ((labels == X).sum(axis=1) == N - D).all()
    for b in range(B):
        (pos,) = np.nonzero(labels[b] != X)
        value_of = dict(zip(keys[b].tolist(), values[b].tolist()))
        # Each key is queried exactly once and labelled with its own value.
        assert sorted(inputs[b, pos].tolist()) == sorted(value_of)
        assert [value_of[k] for k in inputs[b, pos].tolist()] == labels[b, pos].tolist()
    if not random_non_queries:
        # Every input outside the context and the queries is the 0 placeholder.
        query_region = inputs[:, 2 * D :]
        assert ((query_region == 0) == (labels[:, 2 * D :] == X)).all()
    else:
        assert ((inputs >= 0) & (inputs < V)).all()


def test_multiquery_ar_filler_only_replaces_zeros():
    plain, plain_labels = multiquery_ar(8192, 64, 4, 500, random_non_queries=False, seed=11)
    filled, labels = multiquery_ar(8192, 64, 4, 500, random_non_queries=True, seed=11)
    np.testing.assert_array_equal(labels, plain_labels)
    zeros = plain == 0
    np.testing.assert_array_equal(filled[~zeros], plain[~zeros])
    # Uniform over [0, V): a few of the 28k filler draws may be 0, but nearly all are not, and they spread out.
    assert (filled[zeros] != 0).mean() > 0.99
    assert len(np.unique(filled[zeros])) > 4000


def test_multiquery_ar_reproducible_from_seed():
    a = multiquery_ar(8192, 64, 4, 50, seed=5)
    b = multiquery_ar(8192, 64, 4, 50, seed=5)
    c = multiquery_ar(8192, 64, 4, 50, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[0] != c[0]).mean() > 0.5


def test_multiquery_ar_power_law_favours_short_gaps():
    # N=64, D=4: 28 candidate gaps. Uniform (a=1) gives a mean gap of 13.5; a=0.01 makes p(g) ∝ ~1/(g+1).
    def mean_gap(power_a):
        _, labels = multiquery_ar(8192, 64, 4, 2000, power_a=power_a, random_non_queries=False, seed=0)
        _, pos = np.nonzero(labels != X)
        return ((pos - 8) / 2).mean()

    assert mean_gap(0.01) < 9.0
    assert 13.0 < mean_gap(1.0) < 14.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(seq_len=63), "seq_len"),
        (dict(vocab_size=64), "vocab_size"),
        (dict(num_kv_pairs=17), "num_kv_pairs"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(num_examples=0), "num_examples"),
        (dict(power_a=0.0), "power_a"),
        (dict(power_a=float("nan")), "power_a"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
    ],
)
def test_multiquery_ar_rejects_bad_arguments(kwargs, name):
    args = dict(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=3) | kwargs
    positional = [args.pop(k) for k in ("vocab_size", "seq_len", "num_kv_pairs", "num_examples")]
    with pytest.raises(ValueError, match=name):
        multiquery_ar(*positional, **args)


def test_multiquery_ar_largest_pairs_allowed():
    # 4D = N is the boundary of Zoology's assertion: every query slot holds a key.
    inputs, labels = multiquery_ar(8192, 64, 16, 4, random_non_queries=False, seed=0)
    assert ((labels != X).sum(axis=1) == 16).all()
    assert (inputs[:, 32::2] != 0).all()


def test_make_mixture_seeds_padding_and_sweep_segments():
    segments = ((16, 2, 7), (24, 3, 5), (14, 3))
    mixture = make_mixture(segments, 97, seed=4)
    assert [m[0].shape for m in mixture] == [(7, 16), (5, 24), (TEST_NUM_EXAMPLES, 14)]
    for i, ((inputs, labels), segment) in enumerate(zip(mixture, segments)):
        expected = multiquery_ar(97, segment[0], segment[1], inputs.shape[0], seed=4 + i)
        np.testing.assert_array_equal(inputs, expected[0])
        np.testing.assert_array_equal(labels, expected[1])

    padded = make_mixture(segments[:2], 97, seed=4, pad_to=30)
    for (inputs, labels), (raw_inputs, raw_labels) in zip(padded, mixture):
        n = raw_inputs.shape[1]
        assert inputs.shape == labels.shape == (raw_inputs.shape[0], 30)
        np.testing.assert_array_equal(inputs[:, :n], raw_inputs)
        np.testing.assert_array_equal(labels[:, :n], raw_labels)
        assert (inputs[:, n:] == 0).all() and (labels[:, n:] == X).all()

    with pytest.raises(ValueError, match="pad_to"):
        make_mixture(segments, 97, seed=4, pad_to=20)
    with pytest.raises(ValueError, match="segments"):
        make_mixture([(16,)], 97, seed=4)
    # Every segment of the standard sweep is valid at the standard vocabulary.
    for seq_len, num_kv_pairs, *_ in TRAIN_SEGMENTS + TEST_SEGMENTS:
        inputs, _ = multiquery_ar(VOCAB_SIZE, seq_len, num_kv_pairs, 1, seed=0)
        assert inputs.shape == (1, seq_len)
