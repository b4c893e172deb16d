"""Sharded document corpora (train/data/records.py, train/data/local_text.py): .jsonl, .jsonl.gz, .jsonl.zst and
.parquet files give one document per record, mixed with plain files; skipped records counted; the split a stable
hash of (file, record index); a file that is not what its suffix says is a one-line error."""

import gzip
import json
import sys
from pathlib import Path

import pytest

from effarch.train.config import DataConfig, TextData
from effarch.train.data import build_data, local_text, records, tfds_writer

zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed (pip install 'effarch[zstd]')")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def make_corpus(root: Path, field: str = "text") -> dict[str, bytes]:
    """Writes a mixed corpus under root; returns {key: text} of the documents it should give."""
    root.mkdir(parents=True, exist_ok=True)
    want = {}
    a = [{field: f"alpha {i} " * (1 + i % 4), "id": i} for i in range(12)]
    a += [{"other": "no field"}, {field: 7}, {field: None}, [1, 2], b'{"%s": "bad \xff utf-8"}' % field.encode(),
          {field: "\ud800 lone surrogate"}, {field: "naïve ✓ </s> 漢字"}]
    raw = _jsonl(a)
    (root / "a.jsonl").write_bytes(raw.replace(b"\n", b"\n\n", 1))  # a blank line 1: line numbers still count it
    for i, row in enumerate(a):
        if isinstance(row, dict) and isinstance(row.get(field), str) and "\ud800" not in row[field]:
            want[f"a.jsonl#{i + (i > 0)}"] = row[field].encode()
    with gzip.open(root / "b.jsonl.gz", "wb") as f:  # with a byte order mark
        f.write("\ufeff".encode() + _jsonl([{field: f"beta {i}"} for i in range(5)]))
    want.update({f"b.jsonl.gz#{i}": f"beta {i}".encode() for i in range(5)})
    (root / "sub").mkdir(exist_ok=True)
    # two zstd frames: a shard written by appending
    (root / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl([{field: "gamma 0"}]))
                                               + zstandard.ZstdCompressor().compress(_jsonl([{field: "gamma 1"}])))
    want.update({"sub/c.jsonl.zst#0": b"gamma 0", "sub/c.jsonl.zst#1": b"gamma 1"})
    texts = [f"delta {i} " * 3 for i in range(9)] + [None]
    pq.write_table(pa.table({field: texts, "n": list(range(10))}), root / "d.parquet", row_group_size=4)
    want.update({f"d.parquet#{i}": t.encode() for i, t in enumerate(texts) if t is not None})
    pq.write_table(pa.table({field: pa.array([b"epsilon", b"\xfe bad"], pa.binary())}), root / "e.parquet")
    want["e.parquet#0"] = b"epsilon"
    (root / "plain.txt").write_text("a plain file is one document\n")
    want["plain.txt"] = b"a plain file is one document\n"
    return want


SKIPPED = {"missing_field": 4, "not_string": 1, "invalid_utf8": 3}  # a.jsonl: 3 + 1 + 2; d: a null; e: bad bytes
RECORDS = 19 + 5 + 2 + 10 + 2


def _documents(builder) -> dict[str, bytes]:
    return {p: t for s in builder.info.splits for p, t in local_text.read_documents(builder, s)}


def test_records_are_documents_in_tfds_order_with_skips_counted(tmp_path, caplog):
    want = make_corpus(tmp_path / "corpus")
    with caplog.at_level("WARNING", logger="effarch"):
        builder = local_text.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"), val_fraction=0.25)
    assert _documents(builder) == want
    for split in builder.info.splits:  # TFDS's order of the keys; the split chosen by a hash of each key
        keys = [p for p, _ in local_text.read_documents(builder, split)]
        assert keys == tfds_writer.tfds_order(keys, split)
        assert all(local_text.in_validation(k, 0.25) == (split == "validation") for k in keys)
    assert set(builder.info.splits) == {"train", "validation"}
    meta = {"field": "text", "record_files": 5, "records": RECORDS, "documents": len(want), "skipped": SKIPPED}
    assert dict(builder.info.metadata) == meta
    assert "3 invalid utf8" in caplog.text and "4 missing field" in caplog.text
    # Read back from the cache by a new builder: the same documents and the metadata kept (metadata.json).
    again = local_text.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"), val_fraction=0.25)
    assert dict(again.info.metadata) == meta and _documents(again) == want
    assert not list((tmp_path / "tfds").rglob("documents.tmp"))  # the temporary text file is gone


def test_adding_a_shard_moves_no_document_between_the_splits(tmp_path):
    make_corpus(tmp_path / "corpus")
    before = local_text.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"), val_fraction=0.3)
    (tmp_path / "corpus" / "f.jsonl").write_bytes(_jsonl([{"text": f"zeta {i}"} for i in range(40)]))
    after = local_text.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"), val_fraction=0.3)
    assert after.builder_config.name != before.builder_config.name
    for split in ("train", "validation"):
        old = {p for p, _ in local_text.read_documents(before, split)}
        new = {p for p, _ in local_text.read_documents(after, split)}
        assert old <= new and all(p.startswith("f.jsonl#") for p in new - old)


def test_sharded_split_with_another_field_and_several_shards(tmp_path):
    import tensorflow_datasets as tfds

    want = make_corpus(tmp_path / "corpus", field="content")
    config = local_text.corpus_config(str(tmp_path / "corpus"), 0.3, field="content")
    assert config.name != local_text.corpus_config(str(tmp_path / "corpus"), 0.3).name  # the field names the corpus
    config = local_text.LocalText.builder_configs.setdefault(config.name, config)
    builder = local_text.LocalText(config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    assert _documents(builder) == want
    assert len(builder.info.splits["train"].shard_lengths) == 3
    assert builder.info.splits["train"].num_bytes == sum(
        tfds_writer.bytes_example_size({"text": len(t), "path": len(p.encode())})
        for p, t in local_text.read_documents(builder, "train"))


def test_text_task_trains_on_the_records(tmp_path):
    want = make_corpus(tmp_path / "corpus")
    text = TextData(source=str(tmp_path / "corpus" / "**" / "*.*"), val_fraction=0.3)
    cfg = DataConfig(task="text", data_dir=str(tmp_path / "tfds"), seq_len=16, text=text)
    stream, (val,) = build_data(cfg, vocab_size=257, batch_size=2)
    train = stream.windows.tokens  # the packed train split: its documents, each followed by the separator
    docs = local_text.read_documents(local_text.prepare(text.source, cfg.data_dir, 0.3), "train")
    assert train.tolist() == [b for _, t in docs for b in [*t, 256]]
    assert {t for _, t in docs} < set(want.values())
    assert val.inputs.shape[1] == 16


@pytest.mark.parametrize("name, content, match", [
    ("x.jsonl", b'{"text": "ok"}\nnot json at all\n', r"x.jsonl line 2 is not JSON \(Expecting value"),
    ("x.jsonl.gz", b'{"text": "plain, not gzip"}\n', r"x.jsonl.gz is not a gzip file \(BadGzipFile"),
    ("x.jsonl.zst", b'{"text": "plain, not zstd"}\n', r"x.jsonl.zst is not a zstd file \(ZstdError"),
    ("x.parquet", b"text,n\nhello,1\n", r"x.parquet is not a Parquet file \("),
    ("x.jsonl", gzip.compress(b'{"text": "gzip named .jsonl"}\n', mtime=0), r"x.jsonl line 1 is not JSON"),
])
def test_a_file_that_is_not_what_its_suffix_says(tmp_path, name, content, match):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "ok.jsonl").write_bytes(_jsonl([{"text": "fine"}] * 3))
    (tmp_path / "corpus" / name).write_bytes(content)
    with pytest.raises(records.BadShard, match=rf"^data.text.source: {tmp_path / 'corpus'}/{match}") as e:
        local_text.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"))
    assert "\n" not in str(e.value)
    (config_dir,) = (tmp_path / "tfds" / "local_text").iterdir()
    assert list(config_dir.iterdir()) == []  # nothing written: TFDS's temporary directory (the text file too) gone


def test_a_field_in_no_record(tmp_path):
    make_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match=r"^data.text.field='body' is in none of the 38 records of the 5 record "
                                         rf"files under {tmp_path / 'corpus'}$"):
        local_text.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"), field="body")


def test_zstd_without_its_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl([{"text": "x"}])))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ValueError, match=r"a.jsonl.zst needs the zstandard package: pip install 'effarch\[zstd\]'"):
        list(records.read_records(tmp_path / "c" / "a.jsonl.zst", "text"))


def test_parquet_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    """Memory bounded by a batch of rows: the reader never asks for a whole file or row group."""
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(1000)]}), tmp_path / "a.parquet")
    asked = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, **kw):
        asked.append(batch_size)
        return iter_batches(self, batch_size=batch_size, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    got = list(records.read_records(tmp_path / "a.parquet", "text"))
    assert got == [(i, f"row {i}".encode()) for i in range(1000)] and asked == [records.PARQUET_BATCH_ROWS]


def test_bytes_task_reads_the_records_field(tmp_path):
    from effarch.train.data.text import read_bytes

    want = make_corpus(tmp_path / "corpus", field="content")
    stream = read_bytes(str(tmp_path / "corpus"), 10**6, str(tmp_path / "tfds"), field="content")
    assert stream.tobytes() == b"".join(t for _, t in sorted(want.items()))  # the documents in key order
