"""The train split's packed windows, read from the corpus by index: memory independent of the corpus size.

The packed stream of a split (train/data/packing.py: every document followed by the separator) is never built.
Instead one pass over the documents records where each document's tokens end in that stream, separator included
(`document_ends`); the array is cached under the data directory, next to the TFDS datasets
(`<data_dir>/effarch_offsets/<corpus>-<key>.npy`, keyed by the corpus fingerprint, split, tokenizer and
`data.text.max_bytes`), and memory-mapped, so later runs skip the pass. Window i covers stream positions
[i·L, i·L + L + 1) (with `data.text.bos`, one position earlier: train/data/packing.py): a binary search in the
ends finds the documents it overlaps, which are read by index from the array_record file (the split's Grain
MapDataset) and tokenized, and the window is cut from them.

The windows are exactly those of `PackedWindows(concatenate(documents))` (same count, same tokens, same masks), so
the shuffled batches of a step, and resuming at a step, are what they were when the stream was held in memory.

Memory: the ends (8 bytes per document, memory-mapped from the cache) and the documents one window overlaps. A
record is read whole, so a window inside one huge file reads that whole file: split such files into documents.
"""

import array
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from effarch.train.data.packing import n_windows, span, window

OFFSETS_DIR = "effarch_offsets"
_FORMAT = 1  # bump when the meaning of the cached ends changes


def tokenizer_key(kind: str, model: str = "", sep_id: int | None = None) -> str:
    """What identifies a tokenizer's output: its kind and model, a model file by the digest of its contents (a
    directory: of its tokenizer.json), and the separator id where the config chooses it (tokenizer hf)."""
    path = os.path.expanduser(model) if model else ""
    if path and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if path and os.path.isfile(path):
        model = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"{kind}:{model}" + ("" if sep_id is None else f":sep={sep_id}")


def document_ends(docs, tokenizer, max_bytes: int) -> np.ndarray:
    """[n_docs] int64: the stream position just past each document's separator, for the documents that
    `text_stream.read_documents` keeps (whole documents in stored order until max_bytes are read, each cut at
    max_bytes). One document in memory at a time."""
    ends, total, pos = array.array("q"), 0, 0
    for i in range(len(docs)):
        if total >= max_bytes:
            break
        text = docs[i][:max_bytes]
        total += len(text)
        pos += len(tokenizer.encode(text)) + 1
        ends.append(pos)
    return np.frombuffer(ends, np.int64).copy() if ends else np.zeros(0, np.int64)


def offsets_path(data_dir: Path, fingerprint: str, tokenizer_id: str, max_bytes: int) -> Path:
    """Where the ends of one (corpus split, tokenizer, max_bytes) are cached."""
    key = hashlib.sha256(repr((_FORMAT, fingerprint, tokenizer_id, max_bytes)).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", fingerprint).strip("_")[:60]
    return Path(data_dir) / OFFSETS_DIR / f"{slug}-{key}.npy"


def cached_document_ends(path: Path, docs, tokenizer, max_bytes: int) -> np.ndarray:
    """The ends from the cache at `path` (memory-mapped), computed and written there on first use. Concurrent
    processes may both compute them; each writes a temporary file and renames it, so a reader never sees half."""
    if not path.exists():
        ends = document_ends(docs, tokenizer, max_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, ends)
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


class CorpusWindows:
    """Window i of a split's packed stream, read from its documents: a grain random-access data source.

    Args:
      docs: the split's documents as bytes, by index (`len`, `[j]`): text_stream.document_source's MapDataset.
      ends: `document_ends` of docs (the cache).
      tokenizer: what encodes a document (the one the ends were counted with).
      seq_len: L, tokens per window.
      max_bytes: each document is cut at this many bytes, as when the ends were counted.
      bos_id: the token every window starts with (train/data/packing.py), None: none. The stream and its cached
        ends are the same with or without it; only the cut into windows differs.
    """

    def __init__(self, docs, ends: np.ndarray, tokenizer, seq_len: int, max_bytes: int, bos_id: int | None = None):
        self.docs, self.ends, self.tokenizer = docs, ends, tokenizer
        self.seq_len, self.sep_id, self.max_bytes, self.bos_id = seq_len, tokenizer.sep_id, max_bytes, bos_id
        self.n_tokens = int(ends[-1]) if len(ends) else 0
        if self.n_tokens < 2:
            raise ValueError(f"the packed stream has {self.n_tokens} tokens: too few for one window")

    def __len__(self) -> int:
        return n_windows(self.n_tokens, self.seq_len, self.bos_id is not None)

    def document(self, j: int) -> np.ndarray:
        """Document j's tokens followed by the separator, [ends[j] - ends[j - 1]] int32."""
        tokens = np.asarray(self.tokenizer.encode(self.docs[j][: self.max_bytes]), np.int32)
        start = int(self.ends[j - 1]) if j else 0
        if len(tokens) + 1 != int(self.ends[j]) - start:  # a stale cache or another tokenizer: never train on it
            raise ValueError(f"document {j} has {len(tokens)} tokens where the cached offsets say "
                             f"{int(self.ends[j]) - start - 1}: delete the offsets cache under {OFFSETS_DIR}/")
        return np.append(tokens, np.int32(self.sep_id))

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [L] int32, labels [L] int32) of window i, reading only the documents it overlaps."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        start, stop = span(i, self.seq_len, self.n_tokens, self.bos_id is not None)
        parts = [np.array([self.sep_id], np.int32)] if start < 0 else []  # BOS: the separator before the stream
        start = max(start, 0)
        j = int(np.searchsorted(self.ends, start, side="right"))  # the first document ending after `start`
        doc_start = int(self.ends[j - 1]) if j else 0
        while doc_start < stop:
            parts.append(self.document(j)[max(start - doc_start, 0) : stop - doc_start])
            doc_start = int(self.ends[j])
            j += 1
        return window(np.concatenate(parts), self.seq_len, self.sep_id, self.bos_id)

    @property
    def tokens(self) -> np.ndarray:
        """The whole packed stream, built in memory: for tests and inspecting small corpora (training never
        calls it)."""
        return np.concatenate([self.document(j) for j in range(len(self.ends))])

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every window in order, in memory (see `tokens`): inputs and labels [len(self), L]."""
        pairs = [self[i] for i in range(len(self))]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])
