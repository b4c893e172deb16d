"""Byte-level language-modelling data from local text files: tokens are UTF-8 bytes (vocabulary 256).

The source is a glob of text files, a directory, or "python_stdlib": the .py files of the running Python's standard
library, a few MB of real text present on every machine, so LM configs and their tests need no download (a glob may
also name .jsonl / .parquet shards: one document per record). The files are read through the TFDS dataset that
train/data/local_text.py builds once under the data directory.
"""

import numpy as np

from effarch.train.data import local_text
from effarch.train.data.labels import IGNORE_LABEL


def read_bytes(source: str, max_bytes: int, data_dir: str = "", field: str = "text") -> np.ndarray:
    """The concatenated bytes (uint8) of the source files, in sorted-path order, at most `max_bytes`, read from the
    source's TFDS dataset under the data directory (built on first use: train/data/local_text.py). `field`: the text's
    field in .jsonl / .parquet files."""
    return local_text.corpus_bytes(source, data_dir, max_bytes, field=field)


def insert_landmarks(tokens: np.ndarray, block_len: int, landmark_token: int) -> np.ndarray:
    """Appends `landmark_token` after every `block_len` tokens of a 1-D stream (the reference code's
    `apply_add_mem_tokens`): position p of the result is a landmark iff p % (block_len + 1) == block_len.
    A trailing partial block gets no landmark."""
    n_full = len(tokens) // block_len
    blocks = tokens[: n_full * block_len].reshape(n_full, block_len)
    marks = np.full((n_full, 1), landmark_token, tokens.dtype)
    return np.concatenate([np.concatenate([blocks, marks], axis=1).reshape(-1), tokens[n_full * block_len :]])


def landmark_targets(
    windows: np.ndarray, landmark_token: int, ignore: int = IGNORE_LABEL
) -> tuple[np.ndarray, np.ndarray]:
    """[N, T + 2] windows -> inputs [N, T] and labels [N, T] (lm_benchmark/optim/utils.py::get_batch).

    The label is the next token, or the one after it when the next token is a landmark (landmarks are never
    predicted); positions whose input is a landmark get `ignore`.
    """
    x = windows[:, :-2]
    y = np.where(windows[:, 1:-1] == landmark_token, windows[:, 2:], windows[:, 1:-1])
    return x, np.where(x == landmark_token, ignore, y)


def byte_lm_examples(
    source: str, seq_len: int, max_bytes: int, val_fraction: float, landmark_block_len: int = 0,
    landmark_token: int = 256, data_dir: str = "", field: str = "text",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows of seq_len + 1 bytes at a stride of seq_len -> (train_inputs, train_labels, val_inputs, val_labels).

    Labels are the inputs shifted by one (next-byte prediction). Consecutive windows share one byte (the last label
    of a window is the first input of the next), so every byte after the first is a target exactly once. The
    validation windows are the last `val_fraction` of the stream: no validation target is ever a training target.
    With `landmark_block_len` L > 0 a landmark token follows every L bytes (windows start on a block boundary:
    seq_len must be a multiple of L + 1), and the labels skip landmarks (`landmark_targets`).
    """
    stream = read_bytes(source, max_bytes, data_dir, field).astype(np.int32)
    extra = 1
    if landmark_block_len:
        if seq_len % (landmark_block_len + 1):
            raise ValueError(f"data.seq_len={seq_len} must be a multiple of landmark_block_len + 1 = "
                             f"{landmark_block_len + 1}")
        stream = insert_landmarks(stream, landmark_block_len, landmark_token)
        extra = 2
    n = (len(stream) - extra) // seq_len
    if n < 2:
        raise ValueError(f"data.text.source {source!r} has {len(stream)} bytes: too few for seq_len={seq_len}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + extra)[None]
    windows = stream[idx]
    n_val = max(1, int(round(n * val_fraction)))
    train, val = windows[:-n_val], windows[-n_val:]
    if landmark_block_len:
        return (*landmark_targets(train, landmark_token), *landmark_targets(val, landmark_token))
    return train[:, :-1], train[:, 1:], val[:, :-1], val[:, 1:]
