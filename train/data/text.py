"""Byte-level language-modelling data from local text files: tokens are UTF-8 bytes (vocabulary 256).

The source is a glob of text files, or "python_stdlib": the .py files of the running Python's standard library,
a few MB of real text present on every machine, so LM configs and their tests need no download.
"""

import glob
import os
import sysconfig

import numpy as np


def _files(source: str) -> list[str]:
    if source == "python_stdlib":
        root = sysconfig.get_paths()["stdlib"]
        files = sorted(glob.glob(os.path.join(root, "*.py")))
    else:
        files = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"data.text_source: no files match {source!r}")
    return files


def read_bytes(source: str, max_bytes: int) -> np.ndarray:
    """The concatenated bytes (uint8) of the source files, in sorted-path order, at most `max_bytes`."""
    chunks, total = [], 0
    for f in _files(source):
        with open(f, "rb") as fh:
            data = fh.read(max_bytes - total)
        chunks.append(np.frombuffer(data, np.uint8))
        total += len(data)
        if total >= max_bytes:
            break
    return np.concatenate(chunks)


def byte_lm_examples(
    source: str, seq_len: int, max_bytes: int, val_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows of seq_len + 1 bytes at a stride of seq_len -> (train_inputs, train_labels, val_inputs, val_labels).

    Labels are the inputs shifted by one (next-byte prediction). Consecutive windows share one byte (the last label
    of a window is the first input of the next), so every byte after the first is a target exactly once. The
    validation windows are the last `val_fraction` of the stream: no validation target is ever a training target.
    """
    stream = read_bytes(source, max_bytes).astype(np.int32)
    n = (len(stream) - 1) // seq_len
    if n < 2:
        raise ValueError(f"data.text_source {source!r} has {len(stream)} bytes: too few for seq_len={seq_len}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    windows = stream[idx]
    n_val = max(1, int(round(n * val_fraction)))
    train, val = windows[:-n_val], windows[-n_val:]
    return train[:, :-1], train[:, 1:], val[:, :-1], val[:, 1:]
