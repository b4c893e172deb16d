"""Packing documents into fixed-length training sequences with a document separator and a loss mask.

Convention (GPT-style concatenate-then-split, with the cross-document label masked):
- The documents are concatenated, each followed by the separator: `d0 SEP d1 SEP d2 SEP ...`. The separator is
  an end-of-document token: the model learns to predict it after a document's last token.
- Window i holds stream positions [i·L, i·L + L + 1): inputs are the first L, labels the last L (next-token
  prediction). A document longer than L continues in the next window, so every target position of the stream is a
  label in exactly one window.
- **No label crosses a document boundary**: the position whose input is a separator would be trained to predict
  the next document's first token from the previous document's context (the mixers carry state across the
  separator), so its label is -100. The separator itself is a label (the last token of a document predicts it).
- The last window is padded to L: pad inputs are the separator and pad labels are -100.
"""

import dataclasses

import numpy as np

from effarch.train.data.labels import IGNORE_LABEL


def concatenate(docs, sep_id: int) -> np.ndarray:
    """[sum(len(d) + 1)] int32: every document followed by the separator."""
    sep = np.array([sep_id], np.int32)
    parts = [p for d in docs for p in (np.asarray(d, np.int32), sep)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def window(chunk: np.ndarray, seq_len: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream positions [i·L, i·L + L + 1) of window i (fewer at the end) -> (inputs [L], labels [L]) int32."""
    inputs = np.full(seq_len, sep_id, np.int32)
    labels = np.full(seq_len, IGNORE_LABEL, np.int32)
    inputs[: len(chunk) - 1] = chunk[:-1]
    labels[: len(chunk) - 1] = chunk[1:]
    labels[inputs == sep_id] = IGNORE_LABEL  # the next document's first token, and the pads
    return inputs, labels


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of a stream of n_tokens: every target position once, the last window padded."""
    return -(-(n_tokens - 1) // seq_len)


@dataclasses.dataclass(frozen=True)
class PackedWindows:
    """The windows of a packed token stream held in memory, by index: a grain random-access data source (`len`,
    `[i]`). The eval split uses it; the train split reads the same windows from the corpus instead
    (train/data/corpus_windows.py), so its memory does not grow with the corpus.

    Attributes:
      tokens: the stream, [N] int32 (`concatenate`).
      seq_len: L, tokens per window.
      sep_id: the separator (also the pad input).
    """

    tokens: np.ndarray
    seq_len: int
    sep_id: int

    def __post_init__(self):
        if len(self.tokens) < 2:
            raise ValueError(f"the packed stream has {len(self.tokens)} tokens: too few for one window")

    def __len__(self) -> int:
        return n_windows(len(self.tokens), self.seq_len)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [L] int32, labels [L] int32) of window i."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        L = self.seq_len
        return window(self.tokens[i * L : i * L + L + 1], L, self.sep_id)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every window in order: inputs and labels [len(self), L]."""
        pairs = [self[i] for i in range(len(self))]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    def labelled_bytes(self, token_bytes: np.ndarray) -> tuple[int, int]:
        """(number of labels, UTF-8 bytes those labels stand for) over all windows: bits per byte is the summed loss
        in bits divided by the second. The windows' labels are exactly the targets tokens[1:] whose input is not a
        separator, so this needs no windows."""
        keep = self.tokens[:-1] != self.sep_id
        return int(keep.sum()), int(token_bytes[self.tokens[1:][keep]].sum())
