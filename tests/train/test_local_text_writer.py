"""The streaming writer of local corpora (train/data/tfds_writer.py): the files TFDS's own writer would produce, byte
for byte (so a corpus gives the batches it gave before), one document in memory at a time, and an interrupted build
that leaves nothing a later run reads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow_datasets.core import example_serializer

from effarch.train.data import local_text, tfds_writer

DOCS = {  # distinct sizes, a nested directory, non-ASCII text and a non-ASCII name
    "a.txt": "alpha document\n" * 7,
    "b.txt": "béta: ünïcode ✓\n" * 5,
    "sub/c.txt": "gamma " * 40,
    "sub/d.txt": "delta\n",
    "e.txt": "epsilon " * 13,
    "f-é.txt": "phi " * 300,
    "g.txt": "g" * 20_000,  # a length past two varint bytes
}


def _write(root: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def corpus(tmp_path):
    return _write(tmp_path / "corpus", DOCS)


def _config(corpus: Path, val_fraction: float) -> local_text.LocalTextConfig:
    config = local_text.corpus_config(str(corpus), val_fraction)
    return local_text.LocalText.builder_configs.setdefault(config.name, config)  # as prepare registers it


def _version_dir(data_dir: Path, builder) -> Path:
    return data_dir / "local_text" / builder.builder_config.name / "1.0.0"


def _tfds_writer(monkeypatch):
    """Builds with TFDS's own writer (its Shuffler, in memory below 1 GB), as local_text did before tfds_writer."""
    monkeypatch.setattr(local_text.LocalText, "_generate_splits", tfds.core.GeneratorBasedBuilder._generate_splits)


@pytest.mark.parametrize("num_shards", [None, 2])
def test_the_files_are_those_tfds_writes(corpus, tmp_path, monkeypatch, num_shards):
    config = _config(corpus, 0.3)
    download = tfds.download.DownloadConfig(num_shards=num_shards)
    ours = local_text.LocalText(config=config, data_dir=str(tmp_path / "ours"), file_format="array_record")
    ours.download_and_prepare(download_config=download)
    with monkeypatch.context() as m:
        _tfds_writer(m)
        theirs = local_text.LocalText(config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
        theirs.download_and_prepare(download_config=download)
    a, b = _version_dir(tmp_path / "ours", ours), _version_dir(tmp_path / "tfds", theirs)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    shards = 2 if num_shards else 1
    assert f"local_text-train.array_record-00001-of-0000{shards}" in names or shards == 1
    assert f"local_text-validation.array_record-00000-of-0000{shards}" in names
    for name in names:
        if name.endswith(".json"):  # dataset_info.json (shard lengths, bytes), features.json
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        else:  # the serialized records, in order (the files match byte for byte too, but their chunk layout is the
            # array_record library's business: a 2 GB build once came out 3 blocks longer on a second run)
            ours_records, tfds_records = (ArrayRecordDataSource([str(d / name)]) for d in (a, b))
            assert len(ours_records) == len(tfds_records) > 0
            assert [ours_records[i] for i in range(len(ours_records))] == [
                tfds_records[i] for i in range(len(tfds_records))], name
    # Read back through TFDS's reader: every document once, in TFDS's order within each split.
    for split, files in ours.split_files().items():
        assert [p for p, _ in local_text.read_documents(ours, split)] == tfds_writer.tfds_order(files, split)
        assert [t for _, t in local_text.read_documents(ours, split)] == [
            DOCS[p].encode() for p in tfds_writer.tfds_order(files, split)]


def test_config_names_the_files_relative_to_the_root(corpus, tmp_path):
    # The relative paths name the records and enter the config's digest: they must stay what pathlib gives.
    for source in (str(corpus), str(corpus / "**" / "*.txt"), str(corpus / "sub" / ".." / "*.txt"), "python_stdlib"):
        root, files = local_text.source_files(source)
        assert local_text.corpus_config(source, 0.3).files == tuple(str(f.relative_to(root)) for f in files)


def test_serialized_size_from_lengths():
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()})
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    for n in (0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21):  # each side of the varint lengths
        for path in ("", "a.txt", "é" * 70):
            record = serializer.serialize_example(features.encode_example({"text": b"x" * n, "path": path}))
            assert len(record) == tfds_writer.bytes_example_size({"text": n, "path": len(path.encode())})


def test_documents_are_read_one_at_a_time(tmp_path, monkeypatch):
    docs = {f"d{i:03d}/{i}.txt": f"document {i} " * (1 + i % 17) for i in range(120)}
    root = _write(tmp_path / "many", docs)
    events = []
    read = local_text.LocalText._generate_examples

    def reading(self, relpaths):
        for key, example in read(self, relpaths):
            events.append("read")
            yield key, example

    class Recording(tfds_writer.ArrayRecordWriter):
        def write(self, record):
            events.append("write")
            return super().write(record)

    monkeypatch.setattr(local_text.LocalText, "_generate_examples", reading)
    monkeypatch.setattr(tfds_writer, "ArrayRecordWriter", Recording)
    builder = local_text.prepare(str(root), str(tmp_path / "tfds"), val_fraction=0.1)
    assert events == ["read", "write"] * len(docs)  # each document written before the next is read
    splits = builder.split_files()
    assert set(splits) == {"train", "validation"} and sorted(splits["train"] + splits["validation"]) == sorted(docs)
    assert all(local_text.in_validation(p, 0.1) for p in splits["validation"])
    for split, files in splits.items():  # the records: the split's documents, in TFDS's order
        assert local_text.read_documents(builder, split) == [
            (p, docs[p].encode()) for p in tfds_writer.tfds_order(files, split)]


def test_an_error_mid_write_leaves_nothing(corpus, tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    read = local_text.LocalText._generate_examples

    def growing(self, relpaths):  # a file grows after its size was taken: the shard count no longer holds
        for i, (key, example) in enumerate(read(self, relpaths)):
            if i == 1:
                example = {**example, "text": example["text"] + b"more"}
            yield key, example

    monkeypatch.setattr(local_text.LocalText, "_generate_examples", growing)
    with pytest.raises(ValueError, match="changed while the corpus was being prepared"):
        local_text.prepare(str(corpus), str(data_dir), 0.3)
    (config_dir,) = (data_dir / "local_text").iterdir()
    assert list(config_dir.iterdir()) == []  # neither a version directory nor TFDS's temporary one


def test_a_leftover_temporary_directory_is_not_read(corpus, tmp_path):
    """What a killed build leaves (test_a_killed_build_is_not_reused makes one for real): TFDS's temporary directory
    with a partial shard. The next prepare deletes it and builds the corpus whole."""
    data_dir = tmp_path / "tfds"
    config = _config(corpus, 0.3)
    left = data_dir / "local_text" / config.name / "incomplete.ABC123_1.0.0"
    left.mkdir(parents=True)
    (left / "local_text-train.array_record-00000-of-00001").write_bytes(b"half a shard")
    assert not local_text.LocalText(config=config, data_dir=str(data_dir), file_format="array_record").is_prepared()
    builder = local_text.prepare(str(corpus), str(data_dir), 0.3)
    assert [p.name for p in left.parent.iterdir()] == ["1.0.0"]
    docs = {p: t for s in ("train", "validation") for p, t in local_text.read_documents(builder, s)}
    assert docs == {k: v.encode() for k, v in DOCS.items()}


@pytest.mark.slow  # a subprocess importing TFDS: ~10 s on 2 loaded cores
def test_a_killed_build_is_not_reused(corpus, tmp_path):
    """SIGKILL after the first record: the temporary directory stays, nothing reads it, the next prepare deletes it
    and builds the corpus whole."""
    data_dir = tmp_path / "tfds"
    kill_after_first_record = (
        "import os, signal, sys\n"
        "from effarch.train.data import local_text, tfds_writer\n"
        "class Killed(tfds_writer.ArrayRecordWriter):\n"
        "    def write(self, record):\n"
        "        super().write(record); os.kill(os.getpid(), signal.SIGKILL)\n"
        "tfds_writer.ArrayRecordWriter = Killed\n"
        "local_text.prepare(sys.argv[1], sys.argv[2], 0.3)\n")
    done = subprocess.run([sys.executable, "-c", kill_after_first_record, str(corpus), str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    (config_dir,) = (data_dir / "local_text").iterdir()
    (left,) = config_dir.iterdir()
    assert left.name.startswith("incomplete.") and any(left.iterdir())  # a partial shard, under TFDS's temporary name
    builder = local_text.LocalText(config=_config(corpus, 0.3), data_dir=str(data_dir), file_format="array_record")
    assert not builder.is_prepared()
    builder = local_text.prepare(str(corpus), str(data_dir), 0.3)
    assert [p.name for p in config_dir.iterdir()] == ["1.0.0"]  # the leftover deleted, the corpus built
    docs = {p: t for s in ("train", "validation") for p, t in local_text.read_documents(builder, s)}
    assert docs == {k: v.encode() for k, v in DOCS.items()}
