"""A TFDS dataset of local text files, one record per document, written as array_record and read without TensorFlow.

`prepare(source, data_dir, val_fraction)` builds (once) and returns a `LocalText` builder; its splits are read with
`builder.as_data_source(split)` (random access, what `tfds.data_source` returns) and wrapped in `grain.MapDataset`.

- `source` is a glob (`~` and `**` expand), a directory (every file under it), or "python_stdlib": the .py files of
  the running Python's standard library, a few MB of real text present on every machine.
- Each prepared corpus is one builder config, named after the source and a digest of its file list (relative path,
  size, modification time) and `val_fraction`: editing, adding or removing a file builds a new config next to the
  old one instead of silently reusing stale records.
- A document goes to "validation" when a hash of its relative path falls in the first `val_fraction` of the hash
  range (at least one document does, and one stays in "train"; a one-file corpus has only "train"): adding a file
  never moves another between the splits.
- Each split is written by train/data/tfds_writer.py, one document in memory at a time (TFDS's own writer holds a
  split in memory up to 1 GB and needs TensorFlow beyond), into the files, record order and dataset_info.json that
  TFDS's writer produces. TFDS builds in a temporary directory and renames it when complete; what a killed build
  leaves there is deleted by the next `prepare`, never read.
- The cache lives under `data_dir` (default `$EFFARCH_DATA_DIR`, else `~/.cache/effarch/tfds`); concurrent
  processes (test workers, multi-process runs on one host) take a file lock, so one builds and the others read.
"""

import dataclasses
import fcntl
import glob
import hashlib
import os
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from effarch.train.data import tfds_writer

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

    def __repr__(self) -> str:  # tfds logs the config of every build; the file list would flood the log
        return f"LocalTextConfig({self.name}: {len(self.files)} files under {self.root})"


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Local text files, one record {"text": the file's bytes, "path": its path relative to the root} per file."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for metadata (README, citations, checksums) next to the builder's module through the package
    # tree; `effarch` is a namespace package, which that lookup cannot walk, so name the places.
    pkg_dir_path = epath.Path(__file__).parent
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "One record per file; validation chosen by a hash of the path."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            description="Local text files, one document per file (effarch.train.data.local_text).",
        )

    def split_files(self) -> dict[str, list[str]]:
        """{split: its documents' relative paths, in sorted-path order}."""
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
        return {split: self._generate_examples(files) for split, files in self.split_files().items()}

    def _generate_splits(self, dl_manager, download_config) -> list[tfds.core.SplitInfo]:
        """Each split written by tfds_writer, one document in memory at a time, in the record order of TFDS's writer
        (which holds a split in memory up to 1 GB, then needs TensorFlow). TFDS calls this inside its temporary
        directory, renamed to the dataset's directory once dataset_info.json is written."""
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


class NotText(ValueError):
    """A file of a text corpus is binary."""


def check_text(path: Path, data: bytes) -> None:
    """NotText when `data` holds a NUL byte, which text never does (git's test for a binary file, applied to the
    whole file): an image, archive or compiled file matched by the source would otherwise be trained on as text."""
    at = data.find(b"\0")
    if at >= 0:
        raise NotText(f"data.text.source: {path} is not a text file (a NUL byte at offset {at}); remove it or narrow "
                      "the source to the text files (a glob such as 'DIR/**/*.txt')")


def corpus_config(source: str, val_fraction: float) -> LocalTextConfig:
    """The builder config of a source: its name carries a digest of the file list, sizes and mtimes."""
    root, files = source_files(source)
    # str(f.relative_to(root)), by slicing the string: pathlib's costs ~0.2 ms a file, run twice per start of a run.
    prefix = str(root).rstrip("/") + "/"
    rel = tuple(s[len(prefix):] if (s := str(f)).startswith(prefix) else str(f.relative_to(root)) for f in files)
    digest = hashlib.sha256(repr((str(root), val_fraction)).encode())
    for f, r in zip(files, rel):
        st = f.stat()
        digest.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    slug = "stdlib" if source == "python_stdlib" else re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_")
    name = f"{slug or 'text'}_{digest.hexdigest()[:16]}"
    return LocalTextConfig(name=name, root=str(root), files=rel, val_fraction=val_fraction,
                           description=f"{source} ({len(files)} files)")


def prepare(source: str, data_dir: str = "", val_fraction: float = 0.02) -> LocalText:
    """The prepared builder of `source` under the data directory (built on first use, then read from the cache)."""
    config = corpus_config(source, val_fraction)
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


def corpus_bytes(source: str, data_dir: str, max_bytes: int, val_fraction: float = 0.02) -> np.ndarray:
    """The concatenated bytes (uint8) of every document of the source, in sorted-path order, at most `max_bytes`:
    the stream of the `bytes` task, read from the prepared dataset."""
    builder = prepare(source, data_dir, val_fraction)
    docs = sorted(d for split in builder.info.splits for d in read_documents(builder, split))
    return np.frombuffer(b"".join(text for _, text in docs)[:max_bytes], np.uint8)
