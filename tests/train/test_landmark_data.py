"""Landmark data option of the bytes task: insertion layout, targets that skip landmarks, config checks."""

import numpy as np
import pytest

from effarch.train.config import ConfigError, load_config
from effarch.train.data import build_data
from effarch.train.data.text import insert_landmarks, landmark_targets

LM = 99


def test_insert_landmarks_known_answer():
    out = insert_landmarks(np.arange(7), 3, LM)
    np.testing.assert_array_equal(out, [0, 1, 2, LM, 3, 4, 5, LM, 6])


def test_targets_skip_landmarks_and_landmark_inputs_are_ignored():
    # Stream 0 1 2 LM 3 4 5 LM 6 ..., window of T + 2 = 8.
    windows = insert_landmarks(np.arange(10), 3, LM)[None, :8]
    x, y = landmark_targets(windows, LM)
    np.testing.assert_array_equal(x, [[0, 1, 2, LM, 3, 4]])
    np.testing.assert_array_equal(y, [[1, 2, 3, -100, 4, 5]])


def test_byte_windows_are_aligned_and_never_predict_a_landmark():
    cfg = load_config([], ["data.task=bytes", "data.seq_len=24", "data.text.max_bytes=20000",
                           "data.landmark.block_len=5", "model.vocab_size=257", "model.mixers=[landmark]",
                           "model.landmark.block_len=5"])
    stream, evals = build_data(cfg.data, cfg.model.vocab_size, batch_size=4)
    for x, y in ((stream.inputs, stream.labels), (evals[0].inputs, evals[0].labels)):
        assert x.shape[1] == 24
        np.testing.assert_array_equal(x == 256, np.broadcast_to(np.arange(24) % 6 == 5, x.shape))
        assert not np.any(y == 256)
        np.testing.assert_array_equal(y == -100, x == 256)


def test_mismatched_block_len_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.landmark.block_len=3 must equal model.landmark.block_len=5"):
        load_config([], ["data.task=bytes", "data.seq_len=24", "data.landmark.block_len=3", "model.vocab_size=257",
                         "model.mixers=[landmark]", "model.landmark.block_len=5"])
    with pytest.raises(ConfigError, match="seq_len"):
        load_config([], ["data.task=bytes", "data.seq_len=25", "data.landmark.block_len=5"])
