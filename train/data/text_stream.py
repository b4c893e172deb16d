"""The `text` task: documents from TFDS -> tokens -> packed windows -> a Grain MapDataset, addressed by step.

- Documents come from `data.text.source`: a local corpus (a glob, a directory or "python_stdlib"), built once
  into a TFDS array_record dataset under the data directory (train/data/local_text.py), or `tfds:NAME`, any
  prepared TFDS dataset under `data.data_dir`, whose `data.text.field` holds the text. Both are read through the
  random-access `ArrayRecordDataSource` wrapped in `grain.MapDataset` (no TensorFlow).
- `data.text.train_split` / `data.text.eval_split` name the splits; at most `data.text.max_bytes` /
  `data.text.max_eval_bytes` of text are read from each (whole documents in stored order, each cut at the limit).
- Windows are packed by train/data/packing.py (separator, cross-document labels masked, pads -100; with
  `data.text.bos`, each window starts with a BOS token, id `bos_id`). The train split is never held in memory: its
  windows are read from the array_record files by index (train/data/corpus_windows.py; document offsets computed
  once and cached under the data directory), so memory does not grow with the corpus or `data.text.max_bytes`. The
  eval split (`data.text.max_eval_bytes`) is packed in memory.
- The order: epoch e (every window once) is Grain's index shuffle with seed (derived(data.seed) + e). Global batch
  `step` holds the windows at positions [step·B, (step + 1)·B) of that endless sequence, so it is a pure function of
  (data config, corpus, step): a resumed run, a prefetching thread and every process see the same batches, and a
  process loads only its `rows` of them.
"""

import threading

import grain
import numpy as np
import tensorflow_datasets as tfds

from effarch.train.data import local_text
from effarch.train.data.corpus_windows import CorpusWindows, cached_document_ends, offsets_path, tokenizer_key
from effarch.train.data.packing import PackedWindows, concatenate
from effarch.train.data.tokenizers import Tokenizer, text_tokenizer


def _grain_seed(seed: int) -> int:
    # Grain seeds epoch e with seed + e; spreading the user's seeds apart keeps seed s, epoch 1 from being
    # seed s + 1, epoch 0.
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1, np.uint32)[0])


def _text_of(record, field: str) -> bytes:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"data.text.field={field!r} is not a feature of the dataset (it has {keys})")
    text = record[field]
    if isinstance(text, np.ndarray) and text.ndim == 0:
        text = text.item()
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, bytes):
        raise ValueError(f"data.text.field={field!r} holds {type(text).__name__}, not text")
    return text


def document_source(data_cfg, split: str) -> tuple[grain.MapDataset, str]:
    """(a MapDataset of the split's documents as bytes, a fingerprint naming the corpus and split)."""
    source = data_cfg.text.source
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        data_dir = local_text.resolve_data_dir(data_cfg.data_dir)
        try:
            src = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
        except Exception as e:  # tfds raises several types (not found, not prepared, unknown split)
            raise ValueError(f"data.text.source={source!r}: cannot read split {split!r} of a prepared TFDS dataset "
                             f"under {data_dir} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None
        field = data_cfg.text.field
        fingerprint = f"tfds:{name}:{split}:{len(src)}"
    else:
        builder = local_text.prepare(source, data_cfg.data_dir, data_cfg.text.val_fraction, data_cfg.text.field)
        if split not in builder.info.splits:
            raise ValueError(f"data: split {split!r} does not exist in {source!r}; it has "
                             f"{sorted(builder.info.splits)}")
        src = builder.as_data_source(split=split)
        field = "text"
        fingerprint = f"local_text/{builder.builder_config.name}:{split}"
    return grain.MapDataset.source(src).map(lambda r: _text_of(r, field)), fingerprint


def read_documents(docs: grain.MapDataset, max_bytes: int) -> list[bytes]:
    """Whole documents in stored order until `max_bytes` are read (each document cut at the limit)."""
    out, total = [], 0
    for i in range(len(docs)):
        if total >= max_bytes:
            break
        text = docs[i][: max_bytes]
        out.append(text)
        total += len(text)
    return out


def bos_id(text_cfg, tokenizer: Tokenizer) -> int | None:
    """The id every window starts with (`data.text.bos`): one past the tokenizer's ids (bytes: 257), a token that
    appears nowhere else, so the model cannot confuse it with the separator, which also occurs mid-window (Llama's
    <s> and </s> are two tokens too). None without `data.text.bos`."""
    return tokenizer.vocab_size if text_cfg.bos else None


def ids_needed(text_cfg, tokenizer: Tokenizer) -> int:
    """The ids the model must hold: the tokenizer's, and BOS."""
    return tokenizer.vocab_size + bool(text_cfg.bos)


def pack_split(data_cfg, tokenizer: Tokenizer, split: str, max_bytes: int) -> tuple[PackedWindows, str]:
    """The split's packed windows, in memory (the eval split)."""
    docs, fingerprint = document_source(data_cfg, split)
    texts = read_documents(docs, max_bytes)
    tokens = concatenate([tokenizer.encode(t) for t in texts], tokenizer.sep_id)
    if len(tokens) < 2:
        raise ValueError(f"data.text.source {data_cfg.text.source!r}: split {split!r} holds no text")
    return PackedWindows(tokens, data_cfg.seq_len, tokenizer.sep_id, bos_id(data_cfg.text, tokenizer)), fingerprint


def corpus_split(data_cfg, tokenizer: Tokenizer, split: str, max_bytes: int) -> tuple[CorpusWindows, str]:
    """The split's packed windows, read from the corpus by index (the train split): the same windows as
    `pack_split`, in memory independent of the corpus size."""
    docs, fingerprint = document_source(data_cfg, split)
    path = offsets_path(local_text.resolve_data_dir(data_cfg.data_dir), fingerprint,
                        tokenizer_key(data_cfg.text.tokenizer, data_cfg.text.tokenizer_model,
                                      tokenizer.sep_id if data_cfg.text.tokenizer == "hf" else None), max_bytes)
    ends = cached_document_ends(path, docs, tokenizer, max_bytes)
    if (int(ends[-1]) if len(ends) else 0) < 2:
        raise ValueError(f"data.text.source {data_cfg.text.source!r}: split {split!r} holds no text")
    windows = CorpusWindows(docs, ends, tokenizer, data_cfg.seq_len, max_bytes, bos_id(data_cfg.text, tokenizer))
    return windows, fingerprint


class TextStream:
    """Batches of packed windows by step: `batch(step, rows)` -> (inputs, labels) [rows, seq_len] int32."""

    def __init__(self, windows: PackedWindows | CorpusWindows, batch_size: int, seed: int, fingerprint: str = ""):
        if len(windows) < batch_size:
            raise ValueError(f"the train split packs into {len(windows)} windows of data.seq_len={windows.seq_len}, "
                             f"fewer than train.batch_size={batch_size}: give data.text.max_bytes or more text")
        self.windows = windows
        self.batch_size = batch_size
        self.fingerprint = fingerprint
        self.dataset = grain.MapDataset.source(windows).shuffle(seed=_grain_seed(seed))
        self.max_labels_per_example = windows.seq_len
        self._lock = threading.Lock()  # the loop's prefetch thread and the main thread may both ask

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Global batch `step` (or the `rows` of it that this process loads)."""
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)[rows]
        with self._lock:
            pairs = [self.dataset[i] for i in positions]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    def position(self, step: int) -> dict:
        """Where batch `step` starts: epoch and window offset in it, and the corpus (for the checkpoint)."""
        epoch, offset = divmod(step * self.batch_size, len(self.windows))
        return {"epoch": epoch, "window": offset, "windows_per_epoch": len(self.windows), "corpus": self.fingerprint}


def build_text_data(data_cfg, vocab_size: int, batch_size: int):
    """(TextStream over the train split, (inputs, labels, bytes per label) of the eval split)."""
    tokenizer = text_tokenizer(data_cfg.text)
    if vocab_size < ids_needed(data_cfg.text, tokenizer):
        bos = f" and BOS id {bos_id(data_cfg.text, tokenizer)} (data.text.bos)" if data_cfg.text.bos else ""
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the {ids_needed(data_cfg.text, tokenizer)} "
                         f"ids of data.text.tokenizer={data_cfg.text.tokenizer} (separator id {tokenizer.sep_id}"
                         f"{bos} included)")
    train, fingerprint = corpus_split(data_cfg, tokenizer, data_cfg.text.train_split, data_cfg.text.max_bytes)
    val, _ = pack_split(data_cfg, tokenizer, data_cfg.text.eval_split, data_cfg.text.max_eval_bytes)
    n_labels, n_bytes = val.labelled_bytes(tokenizer.token_bytes())
    vx, vy = val.all()
    return TextStream(train, batch_size, data_cfg.seed, fingerprint), (vx, vy, n_bytes / max(n_labels, 1))
