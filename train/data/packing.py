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
- **BOS** (`data.text.bos`, `bos_id` here): every window starts with a fixed beginning-of-sequence token, as each
  training sequence of Llama starts with <s> (arXiv 2302.13971) and as StreamingLLM's pre-training puts a learnable
  sink token first (arXiv 2309.17453 §3.3), so that the model can form its attention sink on a token that is the
  same at position 0 of every window. The content shifts right by one: window i holds stream positions
  [i·L - 1, i·L + L) with input 0 replaced by BOS (stream position -1 counts as a separator: the first document
  starts like every other). The labels are those the same window would have without the replacement, so the
  labelled stream positions are exactly those without BOS (every target once, a document's first token masked, the
  same number of labels at every L): only the context differs, window i's first label being predicted from BOS
  alone.
"""

import dataclasses

import numpy as np

from effarch.train.data.labels import IGNORE_LABEL


def concatenate(docs, sep_id: int) -> np.ndarray:
    """[sum(len(d) + 1)] int32: every document followed by the separator."""
    sep = np.array([sep_id], np.int32)
    parts = [p for d in docs for p in (np.asarray(d, np.int32), sep)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def window(chunk: np.ndarray, seq_len: int, sep_id: int, bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The L + 1 tokens (fewer at the end) of window i -> (inputs [L], labels [L]) int32: stream positions
    [i·L, i·L + L + 1), or with bos_id [i·L - 1, i·L + L) (`span`), input 0 then replaced by BOS."""
    inputs = np.full(seq_len, sep_id, np.int32)
    labels = np.full(seq_len, IGNORE_LABEL, np.int32)
    inputs[: len(chunk) - 1] = chunk[:-1]
    labels[: len(chunk) - 1] = chunk[1:]
    labels[inputs == sep_id] = IGNORE_LABEL  # the next document's first token, and the pads
    if bos_id is not None:
        inputs[0] = bos_id  # after the mask: the label is the one the stream's own token would give
    return inputs, labels


def n_windows(n_tokens: int, seq_len: int, bos: bool = False) -> int:
    """Windows of a stream of n_tokens: every target position once, the last window padded. With BOS the stream
    is read with one separator before it (`span`), one token more."""
    return -(-(n_tokens + bos - 1) // seq_len)


def span(i: int, seq_len: int, n_tokens: int, bos: bool = False) -> tuple[int, int]:
    """Stream positions [start, stop) that window i reads (start -1 with BOS: the separator before the stream)."""
    start = i * seq_len - bos
    return start, min(start + seq_len + 1, n_tokens)


@dataclasses.dataclass(frozen=True)
class PackedWindows:
    """The windows of a packed token stream held in memory, by index: a grain random-access data source (`len`,
    `[i]`). The eval split uses it; the train split reads the same windows from the corpus instead
    (train/data/corpus_windows.py), so its memory does not grow with the corpus.

    Attributes:
      tokens: the stream, [N] int32 (`concatenate`).
      seq_len: L, tokens per window.
      sep_id: the separator (also the pad input).
      bos_id: the token every window starts with (module docstring), None: none.
    """

    tokens: np.ndarray
    seq_len: int
    sep_id: int
    bos_id: int | None = None

    def __post_init__(self):
        if len(self.tokens) < 2:
            raise ValueError(f"the packed stream has {len(self.tokens)} tokens: too few for one window")

    def __len__(self) -> int:
        return n_windows(len(self.tokens), self.seq_len, self.bos_id is not None)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [L] int32, labels [L] int32) of window i."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        start, stop = span(i, self.seq_len, len(self.tokens), self.bos_id is not None)
        chunk = self.tokens[max(start, 0) : stop]
        if start < 0:
            chunk = np.concatenate([np.array([self.sep_id], np.int32), chunk])
        return window(chunk, self.seq_len, self.sep_id, self.bos_id)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every window in order: inputs and labels [len(self), L]."""
        pairs = [self[i] for i in range(len(self))]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    def labelled_bytes(self, token_bytes: np.ndarray) -> tuple[int, int]:
        """(number of labels, UTF-8 bytes those labels stand for) over all windows: bits per byte is the summed loss
        in bits divided by the second. The windows' labels are exactly the targets tokens[1:] whose input is not a
        separator, so this needs no windows (with or without BOS: the same labels)."""
        keep = self.tokens[:-1] != self.sep_id
        return int(keep.sum()), int(token_bytes[self.tokens[1:][keep]].sum())
