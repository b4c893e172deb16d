"""A TFDS dataset of local text files or document shards, one record per document, written as array_record and read
without TensorFlow.

`prepare(source, data_dir, val_fraction, field)` builds (once) and returns a `LocalText` builder; its splits are read
with `builder.as_data_source(split)` (random access, what `tfds.data_source` returns) and wrapped in
`grain.MapDataset`.

- `source` is a glob (`~` and `**` expand), a directory (every file under it), or "python_stdlib": the .py files of
  the running Python's standard library, a few MB of real text present on every machine.
- A plain file is one document. A `.jsonl`, `.jsonl.gz`, `.jsonl.zst` or `.parquet` file holds one document per
  record, its text in the field `field` (`data.text.field`; train/data/records.py reads them); records without
  that field, with a value that is not a string, or with invalid UTF-8 are skipped, and their counts are logged and
  kept in the dataset's metadata.json (`info.metadata["skipped"]`). A corpus may mix both kinds.
- Each prepared corpus is one builder config, named after the source and a digest of its file list (relative path,
  size, modification time), `val_fraction` and (with record files) `field`: editing, adding or removing a file
  builds a new config next to the old one instead of silently reusing stale records.
- A document goes to "validation" when a hash of its key (a plain file's relative path; a record's
  "PATH#INDEX", its file and record index) falls in the first `val_fraction` of the hash range (at least one
  document does, and one stays in "train"; a one-document corpus has only "train"): adding a file never moves
  another document between the splits.
- Each split is written by train/data/tfds_writer.py, one document in memory at a time (TFDS's own writer holds a
  split in memory up to 1 GB and needs TensorFlow beyond), into the files, record order and dataset_info.json that
  TFDS's writer produces. Record files are read twice: once in file order (each valid record's text appended to a
  temporary file, its offset and length kept: 8 numbers a document), then in TFDS's order from that file. TFDS
  builds in a temporary directory and renames it when complete; what a killed build leaves there (that file
  included) is deleted by the next `prepare`, never read.
- The cache lives under `data_dir` (default `$EFFARCH_DATA_DIR`, else `~/.cache/effarch/tfds`); concurrent
  processes (test workers, multi-process runs on one host) take a file lock, so one builds and the others read.
"""

import array
import dataclasses
import fcntl
import glob
import hashlib
import logging
import os
import re
import shutil
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import hashing

from effarch.train.data import records, tfds_writer
from effarch.train.data.records import is_record_file

log = logging.getLogger("effarch")
DEFAULT_DATA_DIR = "~/.cache/effarch/tfds"


def resolve_data_dir(data_dir: str = "") -> Path:
    """`data_dir` if given, else $EFFARCH_DATA_DIR, else ~/.cache/effarch/tfds (expanded, absolute)."""
    return Path(os.path.expanduser(data_dir or os.environ.get("EFFARCH_DATA_DIR") or DEFAULT_DATA_DIR)).absolute()


def source_files(source: str) -> tuple[Path, list[Path]]:
    """(root, sorted files) of a text source: "python_stdlib", a directory or a glob."""
    if source == "python_stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py"), key=str)
    else:
        expanded = os.path.expanduser(source)
        if os.path.isdir(expanded):
            root = Path(expanded)
            files = sorted((p for p in root.rglob("*") if p.is_file()), key=str)
        else:
            files = sorted((Path(f) for f in glob.glob(expanded, recursive=True) if os.path.isfile(f)), key=str)
            root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    if not files:
        raise FileNotFoundError(f"data.text.source: no files match {source!r}")
    return root.absolute(), [f.absolute() for f in files]


def in_validation(relpath: str, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its path, read as a number in [0, 1), is below val_fraction."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64
    return h < val_fraction


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """One corpus: the files it reads and how they split."""

    root: str = ""
    files: tuple[str, ...] = ()  # relative to root
    val_fraction: float = 0.02
    field: str = "text"  # the text's field in the records of .jsonl / .parquet files

    def __repr__(self) -> str:  # tfds logs the config of every build; the file list would flood the log
        return f"LocalTextConfig({self.name}: {len(self.files)} files under {self.root})"


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Local documents, one record {"text": the document's bytes, "path": its key} each: a plain file's bytes and
    its path relative to the root, or a record file's record and "PATH#INDEX"."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for metadata (README, citations, checksums) next to the builder's module through the package
    # tree; `effarch` is a namespace package, which that lookup cannot walk, so name the places.
    pkg_dir_path = epath.Path(__file__).parent
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "One record per file; validation chosen by a hash of the path."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            description="Local text files, one document per file or per record (effarch.train.data.local_text).",
            # record corpora: {"records": kept, "skipped": {reason: count}, "field": ...} (metadata.json)
            metadata=tfds.core.MetadataDict() if self.has_records else None,
        )

    @property
    def has_records(self) -> bool:
        return any(is_record_file(f) for f in self.builder_config.files)

    def split_files(self) -> dict[str, list[str]]:
        """{split: its documents' relative paths, in sorted-path order} (a corpus of plain files)."""
        cfg = self.builder_config
        val = {f for f in cfg.files if in_validation(f, cfg.val_fraction)}
        if not val and len(cfg.files) > 1:  # a small corpus: hold out the document of smallest hash
            val = {min(cfg.files, key=lambda f: hashlib.sha256(f.encode()).digest())}
        if len(val) == len(cfg.files) > 1:  # keep at least one training document
            val.discard(max(val, key=lambda f: hashlib.sha256(f.encode()).digest()))
        splits = {"train": [f for f in cfg.files if f not in val]}
        if val:  # a one-file corpus has no validation split
            splits["validation"] = [f for f in cfg.files if f in val]
        return splits

    def _split_generators(self, dl_manager):
        # What TFDS's own writer would consume (see _generate_splits, which replaces it): kept so that a test can
        # build a corpus both ways and compare the files.
        if self.has_records:
            raise NotImplementedError("a corpus of record files is written by LocalText._generate_splits only")
        return {split: self._generate_examples(files) for split, files in self.split_files().items()}

    def _generate_splits(self, dl_manager, download_config) -> list[tfds.core.SplitInfo]:
        """Each split written by tfds_writer, one document in memory at a time, in the record order of TFDS's writer
        (which holds a split in memory up to 1 GB, then needs TensorFlow). TFDS calls this inside its temporary
        directory, renamed to the dataset's directory once dataset_info.json is written."""
        if self.has_records:
            return self._generate_record_splits(download_config)
        root, infos = Path(self.builder_config.root), []
        for split, files in self.split_files().items():
            order = tfds_writer.tfds_order(files, split)
            sizes = [tfds_writer.bytes_example_size({"text": (root / f).stat().st_size, "path": len(f.encode())})
                     for f in order]
            infos.append(tfds_writer.write_split(split, self._get_filename_template(split), self.info.features,
                                                 sizes, self._generate_examples(order), order,
                                                 download_config.get_shard_config()))
        return infos

    def _generate_examples(self, relpaths):
        root = Path(self.builder_config.root)
        for rel in relpaths:
            # Raw bytes: Text stores them unchanged and gives them back as bytes, so nothing is re-encoded.
            text = (root / rel).read_bytes()
            check_text(root / rel, text)
            yield rel, {"text": text, "path": rel}

    def _generate_record_splits(self, download_config) -> list[tfds.core.SplitInfo]:
        """A corpus with record files: one pass in file order writes each document's text to a temporary file (a
        record file cannot be read by index), then each split is written from it in TFDS's order."""
        cfg = self.builder_config
        root, infos = Path(cfg.root), []
        # In TFDS's temporary directory: removed below, or with that directory by the next prepare after a kill.
        spill = Path(self._get_filename_template("train").data_dir) / "documents.tmp"
        try:
            with open(spill, "wb") as out:
                docs = Documents.scan(root, cfg.files, cfg.field, out)
            self.info.metadata.update(docs.metadata(cfg.field))
            docs.log(cfg.field, root)
            with open(spill, "rb") as text:
                for split, indices in docs.splits(cfg.val_fraction).items():
                    order = docs.tfds_order(indices, split)
                    keys = _Keys(docs, order)
                    infos.append(tfds_writer.write_split(split, self._get_filename_template(split), self.info.features,
                                                         docs.example_sizes(order), docs.examples(order, text, root),
                                                         keys, download_config.get_shard_config()))
        finally:
            spill.unlink(missing_ok=True)
        return infos


class Documents:
    """The documents of a corpus with record files, 40 bytes each in memory (never their text): the file, the record
    index (-1 for a plain file, one document), and for a record the offset and length of its text in the temporary
    file; the first 8 bytes of the sha256 of the key, which choose the split (`in_validation`)."""

    def __init__(self, files: tuple[str, ...]):
        self.files = files
        self.file, self.record = array.array("q"), array.array("q")
        self.offset, self.length, self.split_hash = array.array("q"), array.array("q"), array.array("Q")
        self.records = 0  # records read from record files, documents or not
        self.record_files = sum(is_record_file(f) for f in files)
        self.skipped = dict.fromkeys(records.SKIP_REASONS, 0)
        self.text_bytes = 0

    def key(self, i: int) -> str:
        rel = self.files[self.file[i]]
        return rel if self.record[i] < 0 else f"{rel}#{self.record[i]}"

    def add(self, file: int, record: int, offset: int, length: int) -> None:
        self.file.append(file)
        self.record.append(record)
        self.offset.append(offset)
        self.length.append(length)
        self.split_hash.append(int.from_bytes(hashlib.sha256(self.key(len(self.file) - 1).encode()).digest()[:8],
                                              "big"))

    @classmethod
    def scan(cls, root: Path, files: tuple[str, ...], field: str, out) -> "Documents":
        """Reads every file in order; each record's text is appended to `out`."""
        docs = cls(files)
        for fi, rel in enumerate(files):
            if not is_record_file(rel):
                docs.add(fi, -1, 0, (root / rel).stat().st_size)
                continue
            for ri, text in records.read_records(root / rel, field):
                docs.records += 1
                if isinstance(text, str):
                    docs.skipped[text] += 1
                    continue
                docs.add(fi, ri, docs.text_bytes, len(text))
                out.write(text)
                docs.text_bytes += len(text)
        if docs.records and docs.skipped["missing_field"] == docs.records:
            raise ValueError(f"data.text.field={field!r} is in none of the {docs.records} records of the "
                             f"{docs.record_files} record files under {root}")
        if not docs.file:
            raise ValueError(f"data.text.source: no document under {root}: every record was skipped "
                             f"({docs.skipped_line()})")
        return docs

    def skipped_line(self) -> str:
        return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.skipped.items())

    def metadata(self, field: str) -> dict:
        return {"field": field, "record_files": self.record_files, "records": self.records,
                "documents": len(self.file), "skipped": dict(self.skipped)}

    def log(self, field: str, root: Path) -> None:
        n_skipped = sum(self.skipped.values())
        (log.warning if n_skipped else log.info)(
            "data.text.source: %d documents under %s, %d of them from the %d records of %d record files; %d records "
            "skipped (%s; field %r)", len(self.file), root, self.records - n_skipped, self.records, self.record_files,
            n_skipped, self.skipped_line(), field)

    def splits(self, val_fraction: float) -> dict[str, np.ndarray]:
        """{split: its documents' indices}: `in_validation` of each key, with the rules of `LocalText.split_files`
        for a corpus where it puts every document or none in validation."""
        h = np.frombuffer(self.split_hash, np.uint64)
        val = h.astype(np.float64) / 2**64 < val_fraction  # = in_validation: h < 2**64 is exact in float64 / 2**64
        if not val.any() and len(h) > 1:
            val[np.argmin(h)] = True
        if val.all() and len(h) > 1:
            val[np.argmax(h)] = False
        out = {"train": np.flatnonzero(~val)}
        if val.any():
            out["validation"] = np.flatnonzero(val)
        return out

    def tfds_order(self, indices: np.ndarray, split: str) -> np.ndarray:
        """`indices` in the order TFDS's writer gives their keys (`tfds_writer.tfds_order`), from 128-bit hashes
        kept as two uint64 arrays rather than Python ints."""
        hasher = hashing.Hasher(split)
        hi, lo = array.array("Q"), array.array("Q")
        for i in indices:
            h = hasher.hash_key(self.key(int(i)))
            hi.append(h >> 64)
            lo.append(h & (2**64 - 1))
        hi, lo = np.frombuffer(hi, np.uint64), np.frombuffer(lo, np.uint64)
        rank = np.lexsort((lo, hi))
        same = np.flatnonzero((hi[rank][1:] == hi[rank][:-1]) & (lo[rank][1:] == lo[rank][:-1]))
        if len(same):
            a, b = indices[rank[same[0]]], indices[rank[same[0] + 1]]
            raise ValueError(f"two examples of split {split!r} share a key: {self.key(a)!r} and {self.key(b)!r}")
        return indices[rank]

    def example_sizes(self, order: np.ndarray) -> array.array:
        return array.array("q", (tfds_writer.bytes_example_size({"text": self.length[i],
                                                                   "path": len(self.key(i).encode())})
                                 for i in order.tolist()))

    def examples(self, order: np.ndarray, text, root: Path):
        """(key, example) of each document in `order`, one in memory at a time; `text`: the temporary file, read
        with pread (a memory map would count the whole file in the process's resident memory)."""
        for i in order.tolist():
            key = self.key(i)
            if self.record[i] < 0:
                data = (root / key).read_bytes()
                check_text(root / key, data)
            else:
                data = os.pread(text.fileno(), self.length[i], self.offset[i])
            yield key, {"text": data, "path": key}


class _Keys(Sequence):
    """The keys of the documents in `order`, made when asked (the writer checks each against its example)."""

    def __init__(self, docs: Documents, order: np.ndarray):
        self.docs, self.order = docs, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.docs.key(int(self.order[i]))


class NotText(ValueError):
    """A file of a text corpus is binary."""


def check_text(path: Path, data: bytes) -> None:
    """NotText when `data` holds a NUL byte, which text never does (git's test for a binary file, applied to the
    whole file): an image, archive or compiled file matched by the source would otherwise be trained on as text."""
    at = data.find(b"\0")
    if at >= 0:
        raise NotText(f"data.text.source: {path} is not a text file (a NUL byte at offset {at}); remove it or narrow "
                      "the source to the text files (a glob such as 'DIR/**/*.txt')")


def corpus_config(source: str, val_fraction: float, field: str = "text") -> LocalTextConfig:
    """The builder config of a source: its name carries a digest of the file list, sizes and mtimes (and the text
    field, for a corpus with record files)."""
    root, files = source_files(source)
    # str(f.relative_to(root)), by slicing the string: pathlib's costs ~0.2 ms a file, run twice per start of a run.
    prefix = str(root).rstrip("/") + "/"
    rel = tuple(s[len(prefix):] if (s := str(f)).startswith(prefix) else str(f.relative_to(root)) for f in files)
    digest = hashlib.sha256(repr((str(root), val_fraction)).encode())
    for f, r in zip(files, rel):
        st = f.stat()
        digest.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if any(is_record_file(r) for r in rel):  # a corpus of plain files keeps the name it had before record files
        digest.update(f"field\0{field}\n".encode())
    slug = "stdlib" if source == "python_stdlib" else re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_")
    name = f"{slug or 'text'}_{digest.hexdigest()[:16]}"
    return LocalTextConfig(name=name, root=str(root), files=rel, val_fraction=val_fraction, field=field,
                           description=f"{source} ({len(files)} files)")


def prepare(source: str, data_dir: str = "", val_fraction: float = 0.02, field: str = "text") -> LocalText:
    """The prepared builder of `source` under the data directory (built on first use, then read from the cache).
    `field`: the text's field in record files."""
    config = corpus_config(source, val_fraction, field)
    # Registered as one of the class's configs (the same name means the same files): tfds then neither warns about a
    # custom config nor refuses a second builder of the same corpus in this process.
    config = LocalText.builder_configs.setdefault(config.name, config)
    directory = resolve_data_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / f"local_text-{config.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait, then find it prepared
        builder = LocalText(config=config, data_dir=str(directory), file_format="array_record")
        if not builder.is_prepared():
            remove_incomplete(directory / "local_text" / config.name)
            tfds.disable_progress_bar()
            builder.download_and_prepare()
    return builder


def remove_incomplete(config_dir: Path) -> None:
    """Deletes what an interrupted build of this corpus left: TFDS builds in `incomplete.XXXXXX_<version>/` next to
    the version directory and renames it only once complete, so a process killed mid-write leaves that directory
    (never a dataset that looks prepared). Called under the corpus's lock: no other process is writing it."""
    for stale in config_dir.glob("incomplete.*") if config_dir.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)


def read_documents(builder: tfds.core.DatasetBuilder, split: str) -> list[tuple[str, bytes]]:
    """[(path, text bytes)] of one split, in the order of the array_record file."""
    src = builder.as_data_source(split=split)
    return [(r["path"].decode(), r["text"]) for r in (src[i] for i in range(len(src)))]


def corpus_bytes(source: str, data_dir: str, max_bytes: int, val_fraction: float = 0.02, field: str = "text"
                 ) -> np.ndarray:
    """The concatenated bytes (uint8) of every document of the source, in sorted-path order, at most `max_bytes`:
    the stream of the `bytes` task, read from the prepared dataset."""
    builder = prepare(source, data_dir, val_fraction, field)
    docs = sorted(d for split in builder.info.splits for d in read_documents(builder, split))
    return np.frombuffer(b"".join(text for _, text in docs)[:max_bytes], np.uint8)
