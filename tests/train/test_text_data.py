"""The text data pipeline: TFDS builder round trip, packing masks, per-epoch shuffle, process rows, config errors,
the train windows read from the corpus by index (never the whole corpus)."""

import dataclasses

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from effarch.train.config import ConfigError, DataConfig, TextData, load_config
from effarch.train.data import build_data, local_text
from effarch.train.data.corpus_windows import CorpusWindows, document_ends
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.data.packing import PackedWindows, concatenate
from effarch.train.data.text import read_bytes
from effarch.train.data.text_stream import TextStream, read_documents
from effarch.train.data.tokenizers import ByteTokenizer

DOCS = {  # distinct sizes, a nested directory, non-ASCII text
    "a.txt": "alpha document\n" * 7,
    "b.txt": "béta: ünïcode ✓\n" * 5,
    "sub/c.txt": "gamma " * 40,
    "sub/d.txt": "delta\n",
    "e.txt": "epsilon " * 13,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_builder_round_trip_and_cache(corpus, tmp_path):
    data_dir = tmp_path / "tfds"
    builder = local_text.prepare(str(corpus), str(data_dir), val_fraction=0.2)
    assert builder.info.file_format.value == "array_record"
    shards = sorted(p.name for p in (data_dir / "local_text" / builder.builder_config.name / "1.0.0").iterdir())
    assert "local_text-train.array_record-00000-of-00001" in shards
    docs = {path: text for split in ("train", "validation") for path, text in local_text.read_documents(builder, split)}
    assert docs == {k: v.encode() for k, v in DOCS.items()}  # every file, byte for byte, once
    n_val = builder.info.splits["validation"].num_examples
    # The documents whose path hash falls below val_fraction, and only those (no fallback applies to this corpus).
    held_out = {path for path in DOCS if local_text.in_validation(path, 0.2)}
    # Pinned: sha256 of the path, first 8 bytes as a fraction: a.txt 0.097, sub/d.txt 0.024, the others >= 0.349.
    assert held_out == {"a.txt", "sub/d.txt"}
    assert {path for path, _ in local_text.read_documents(builder, "validation")} == held_out and n_val == len(held_out)
    # The same name through the public tfds entry point (what `text_source: tfds:NAME` uses).
    src = tfds.data_source(f"local_text/{builder.builder_config.name}", split="validation", data_dir=str(data_dir))
    assert len(src) == n_val and src[0]["text"] == DOCS[src[0]["path"].decode()].encode()
    # A second prepare reads the cache; a changed file is a new corpus (another config name), built next to it.
    assert local_text.prepare(str(corpus), str(data_dir), 0.2).builder_config.name == builder.builder_config.name
    (corpus / "a.txt").write_text("changed")
    rebuilt = local_text.prepare(str(corpus), str(data_dir), 0.2)
    assert rebuilt.builder_config.name != builder.builder_config.name
    docs = {p: t for s in ("train", "validation") for p, t in local_text.read_documents(rebuilt, s)}
    assert docs["a.txt"] == b"changed"


def test_bytes_task_reads_the_files_through_the_builder(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFARCH_DATA_DIR", str(tmp_path / "env_dir"))
    raw = b"".join(DOCS[k].encode() for k in sorted(DOCS))  # the sorted-path concatenation
    np.testing.assert_array_equal(read_bytes(str(corpus / "**" / "*.txt"), 10_000), np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(read_bytes(str(corpus), 50), np.frombuffer(raw[:50], np.uint8))
    assert (tmp_path / "env_dir" / "local_text").is_dir()  # $EFFARCH_DATA_DIR is where the cache went
    with pytest.raises(FileNotFoundError, match="data.text.source: no files match"):
        read_bytes(str(tmp_path / "nothing*.txt"), 10)


def test_packing_separators_masks_and_pads():
    sep = 9
    stream = concatenate([np.array([1, 2, 3]), np.array([4, 5]), np.array([6])], sep)
    np.testing.assert_array_equal(stream, [1, 2, 3, 9, 4, 5, 9, 6, 9])
    windows = PackedWindows(stream, seq_len=4, sep_id=sep)
    assert len(windows) == 2  # 8 targets: one full window, one padded
    x, y = windows.all()
    np.testing.assert_array_equal(x, [[1, 2, 3, 9], [4, 5, 9, 6]])
    # Label of the separator position (the next document's first token) is masked; the separator itself is a label.
    np.testing.assert_array_equal(y, [[2, 3, 9, IGNORE_LABEL], [5, 9, IGNORE_LABEL, 9]])
    windows = PackedWindows(stream, seq_len=5, sep_id=sep)
    x, y = windows.all()
    np.testing.assert_array_equal(x, [[1, 2, 3, 9, 4], [5, 9, 6, 9, 9]])  # last window padded with the separator
    # pads -100
    np.testing.assert_array_equal(y, [[2, 3, 9, IGNORE_LABEL, 5], [9, IGNORE_LABEL, 9, IGNORE_LABEL, IGNORE_LABEL]])
    # Every target of the stream is a label exactly once: 2, 3, 9, 5, 9, 9 (+ the masked 4, 6).
    assert windows.labelled_bytes(np.ones(10, np.int64)) == (6, 6)
    assert windows.labelled_bytes(np.array([1] * 9 + [0])) == (6, 3)  # the separators stand for no bytes


def test_bos_starts_every_window_and_keeps_the_labels():
    """data.text.bos: window i is the window of the stream with a separator before it, input 0 replaced by BOS; the
    labelled stream positions are those without BOS (a document's first token masked, even at a window start)."""
    sep, bos = 9, 10
    stream = concatenate([np.array([1, 2, 3]), np.array([4, 5]), np.array([6])], sep)  # 1 2 3 9 4 5 9 6 9
    x, y = PackedWindows(stream, seq_len=4, sep_id=sep, bos_id=bos).all()
    np.testing.assert_array_equal(x, [[bos, 1, 2, 3], [bos, 4, 5, 9], [bos, 9, 9, 9]])
    np.testing.assert_array_equal(y, [[IGNORE_LABEL, 2, 3, 9], [IGNORE_LABEL, 5, 9, IGNORE_LABEL],
                                      [9, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL]])
    # Window 1 starts at document 2's first token (4): masked as without BOS; window 2 starts mid-document (9 after
    # 6): its label is kept, predicted from BOS alone.
    rng = np.random.default_rng(0)
    tokens = concatenate([rng.integers(0, 9, n) for n in (50, 1, 7, 90, 3)], sep)
    for L in (2, 5, 8, 64, 200):
        x, y = PackedWindows(tokens, L, sep, bos).all()
        ref_x, ref_y = PackedWindows(np.concatenate([[sep], tokens]).astype(np.int32), L, sep).all()
        assert (x[:, 0] == bos).all() and (x[:, 1:] != bos).all()
        np.testing.assert_array_equal(x[:, 1:], ref_x[:, 1:])  # the content, shifted right by one
        np.testing.assert_array_equal(y, ref_y)
        plain_y = PackedWindows(tokens, L, sep).all()[1]
        np.testing.assert_array_equal(np.sort(y[y != IGNORE_LABEL]), np.sort(plain_y[plain_y != IGNORE_LABEL]))
    assert PackedWindows(tokens, 8, sep, bos).labelled_bytes(np.ones(11, np.int64)) == (
        (PackedWindows(tokens, 8, sep, bos).all()[1] != IGNORE_LABEL).sum(), ) * 2


def test_no_label_crosses_a_document_boundary(corpus, tmp_path):
    text = TextData(source=str(corpus), val_fraction=0.2)
    cfg = DataConfig(task="text", data_dir=str(tmp_path), seq_len=13, text=text)
    stream, (val,) = build_data(cfg, vocab_size=257, batch_size=4)
    x, y = stream.windows.all()
    assert x.shape[1] == 13 and (y[x == 256] == IGNORE_LABEL).all()  # the separator's label is masked
    real = x != 256
    np.testing.assert_array_equal(y[:, :-1][real[:, :-1]], x[:, 1:][real[:, :-1]])  # otherwise the next token
    assert ((y != IGNORE_LABEL).sum(1) >= 1).all()
    # The text of the training documents, in stored order, is the stream minus separators.
    train_docs = local_text.read_documents(local_text.prepare(str(corpus), str(tmp_path), 0.2), "train")
    assert stream.windows.tokens[stream.windows.tokens != 256].astype(np.uint8).tobytes() == b"".join(
        t for _, t in train_docs)
    assert val.name == "text_val" and val.bytes_per_label is not None and 0.8 < val.bytes_per_label < 1


def _stream(n_windows=23, batch_size=4, seed=0):
    tokens = np.arange(n_windows * 3 + 1, dtype=np.int32) % 250  # window i starts with token 3i (mod 250)
    return TextStream(PackedWindows(tokens, 3, sep_id=256), batch_size, seed=seed)


def test_epochs_are_shuffled_deterministically():
    stream = _stream()
    ids = np.concatenate([stream.batch(s)[0][:, 0] // 3 for s in range(23)])  # 92 windows: 4 epochs of 23
    for e in range(4):
        assert sorted(ids[23 * e : 23 * (e + 1)]) == list(range(23))  # every window once per epoch
    assert not np.array_equal(ids[:23], ids[23:46])  # a new order each epoch
    fresh = _stream()  # a restarted process, asked in another order (a prefetching thread)
    for s in [17, 3, 0, 22]:
        np.testing.assert_array_equal(fresh.batch(s)[0], stream.batch(s)[0])
    assert not np.array_equal(_stream(seed=1).batch(0)[0], stream.batch(0)[0])
    assert stream.position(6) == {"epoch": 1, "window": 1, "windows_per_epoch": 23, "corpus": ""}


def test_two_processes_load_the_global_batch():
    stream = _stream(batch_size=6)
    for step in (0, 5, 11):
        x, y = stream.batch(step)
        parts = [stream.batch(step, slice(p * 3, (p + 1) * 3)) for p in range(2)]
        np.testing.assert_array_equal(np.concatenate([a for a, _ in parts]), x)
        np.testing.assert_array_equal(np.concatenate([b for _, b in parts]), y)


@pytest.mark.parametrize("override, match", [
    (["data.text.tokenizer=sentencepiece"], "data.text: tokenizer=sentencepiece needs tokenizer_model"),
    (["data.text.source='tfds:'"], "needs a dataset name"),
    (["data.task=bytes", "data.text.source=tfds:x"], "needs task: text"),
    (["data.text.max_eval_bytes=0"], "max_eval_bytes must be >= 1"),
    (["data.text.tokenizer=word"], "data.text.tokenizer: expected one of"),
    (["data.text.tokenizer=hf"], "data.text: tokenizer=hf needs tokenizer_model"),
    (["data.text.separator_token=</s>"], "data.text: separator_token is for tokenizer=hf, not bytes"),
    (["data.text.bos=maybe"], "data.text.bos"),
    (["data.task=bytes", "data.text.bos=true"], "text.bos is for task: text"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], ["data.task=text", *override])


def test_build_errors_name_the_key(corpus, tmp_path):
    text = TextData(source=str(corpus), val_fraction=0.2)
    base = dict(task="text", data_dir=str(tmp_path), seq_len=8, text=text)
    with pytest.raises(ValueError, match="vocab_size=256 is smaller than the 257 ids of data.text.tokenizer=bytes"):
        build_data(DataConfig(**base), vocab_size=256, batch_size=2)
    with pytest.raises(ValueError, match=r"vocab_size=257 is smaller than the 258 ids .* BOS id 257 \(data.text.bos"):
        build_data(DataConfig(**{**base, "text": dataclasses.replace(text, bos=True)}), vocab_size=257, batch_size=2)
    with pytest.raises(ValueError, match="fewer than train.batch_size=4096"):
        build_data(DataConfig(**base), vocab_size=257, batch_size=4096)
    with pytest.raises(ValueError, match="data.text.source='tfds:no_such_dataset': cannot read split 'train'"):
        build_data(DataConfig(**{**base, "text": dataclasses.replace(text, source="tfds:no_such_dataset")}),
                   vocab_size=257, batch_size=2)
    name = local_text.prepare(str(corpus), str(tmp_path), 0.2).builder_config.name
    with pytest.raises(ValueError, match="data.text.field='body' is not a feature of the dataset"):
        named = dataclasses.replace(text, source=f"tfds:local_text/{name}", field="body")
        build_data(DataConfig(**{**base, "text": named}), vocab_size=257, batch_size=2)


def test_tfds_name_source_matches_the_local_corpus(corpus, tmp_path):
    base = dict(task="text", data_dir=str(tmp_path), seq_len=8)
    local, (lval,) = build_data(DataConfig(text=TextData(source=str(corpus), val_fraction=0.2), **base), vocab_size=257,
                                batch_size=2)
    name = local_text.prepare(str(corpus), str(tmp_path), 0.2).builder_config.name
    named, (nval,) = build_data(DataConfig(text=TextData(source=f"tfds:local_text/{name}", val_fraction=0.2), **base),
                                vocab_size=257, batch_size=2)
    np.testing.assert_array_equal(named.batch(3)[0], local.batch(3)[0])
    np.testing.assert_array_equal(nval.labels, lval.labels)


class _CountingDocs:
    """Documents by index that record which were read (the window reader's only access to the corpus)."""

    def __init__(self, docs):
        self.docs, self.reads = docs, []

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, j):
        self.reads.append(j)
        return self.docs[j]


@pytest.mark.parametrize("seq_len, max_bytes", [(7, 10_000), (40, 10_000), (7, 150)])
def test_corpus_windows_read_only_the_documents_they_overlap(seq_len, max_bytes):
    docs = _CountingDocs([v.encode() for v in DOCS.values()] * 3)  # 15 documents of 6 to 240 bytes
    tok = ByteTokenizer()
    ends = document_ends(docs, tok, max_bytes)
    windows = CorpusWindows(docs, ends, tok, seq_len, max_bytes)
    # The same windows as the packed stream held in memory (what the train split was before).
    texts = read_documents(grain.MapDataset.source(docs.docs), max_bytes)
    packed = PackedWindows(concatenate([tok.encode(t) for t in texts], 256), seq_len, 256)
    assert len(windows) == len(packed) and windows.n_tokens == len(packed.tokens)
    starts = np.concatenate([[0], ends[:-1]])
    for i in range(len(windows)):
        docs.reads = []
        for a, b in zip(windows[i], packed[i]):
            np.testing.assert_array_equal(a, b)
        lo, hi = i * seq_len, min(i * seq_len + seq_len + 1, windows.n_tokens)
        overlapping = [j for j in range(len(ends)) if starts[j] < hi and ends[j] > lo]
        assert docs.reads == overlapping  # each overlapping document read once, nothing else
    with pytest.raises(IndexError):
        windows[len(windows)]
    # With BOS: the same windows as the packed stream's with BOS (train/data/packing.py), the same labels.
    with_bos = CorpusWindows(docs, ends, tok, seq_len, max_bytes, bos_id=257)
    packed = PackedWindows(packed.tokens, seq_len, 256, bos_id=257)
    assert len(with_bos) == len(packed)
    for i in range(len(with_bos)):
        for a, b in zip(with_bos[i], packed[i]):
            np.testing.assert_array_equal(a, b)


def test_train_windows_come_from_the_cached_offsets(corpus, tmp_path, monkeypatch):
    text = TextData(source=str(corpus), val_fraction=0.2)
    cfg = DataConfig(task="text", data_dir=str(tmp_path), seq_len=13, text=text)
    stream, _ = build_data(cfg, vocab_size=257, batch_size=4)
    assert isinstance(stream.windows, CorpusWindows)
    (cached,) = (tmp_path / "effarch_offsets").iterdir()
    np.testing.assert_array_equal(np.load(cached), stream.windows.ends)

    def no_pass(*args):
        raise AssertionError("the offsets were computed again")

    monkeypatch.setattr("effarch.train.data.corpus_windows.document_ends", no_pass)
    again, _ = build_data(cfg, vocab_size=257, batch_size=4)  # a resumed run: the cache, not another pass
    for step in (0, 3, 9):
        np.testing.assert_array_equal(again.batch(step)[0], stream.batch(step)[0])
    # Another max_bytes is another stream: its own offsets (the pass runs, here refused).
    with pytest.raises(AssertionError, match="computed again"):
        smaller = dataclasses.replace(cfg, text=dataclasses.replace(text, max_bytes=100))
        build_data(smaller, vocab_size=257, batch_size=4)
    # A cache that does not match the documents is refused, not trained on.
    np.save(cached, np.asarray(stream.windows.ends) + 1)
    stale, _ = build_data(cfg, vocab_size=257, batch_size=4)
    with pytest.raises(ValueError, match="cached offsets"):
        stale.windows[0]


def test_a_binary_file_in_the_corpus_is_refused_by_name(corpus, tmp_path):
    (corpus / "sub" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    text = TextData(source=str(corpus), val_fraction=0.2)
    base = dict(task="text", data_dir=str(tmp_path / "tfds"), seq_len=8, text=text)
    with pytest.raises(ValueError, match=r"sub/logo.png is not a text file \(a NUL byte at offset 8\)"):
        build_data(DataConfig(**base), vocab_size=257, batch_size=2)
    (corpus / "sub" / "logo.png").unlink()  # nothing half-built stays behind: the corpus builds once it is text
    assert build_data(DataConfig(**base), vocab_size=257, batch_size=2)
