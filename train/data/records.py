"""The documents of a sharded corpus file: one per record of a `.jsonl`, `.jsonl.gz`, `.jsonl.zst` or `.parquet` file.

This is how the corpora that models are pretrained on are distributed (FineWeb, SlimPajama, C4, RedPajama...):
many files, each holding many documents, the text in one field (`data.text.field`, default "text"). A file is read
as a stream, one record at a time (Parquet: 256 rows decoded at a time, from at most one row group's text column
read at once), so memory does not depend on its size.

A record whose field is missing (or null), is not a string, or is not valid UTF-8 is not a document: it is skipped
and counted under one of `SKIP_REASONS` (train/data/local_text.py logs the counts and keeps them in the corpus
metadata). A file that is not what its suffix says (a `.jsonl` line that is not JSON, a `.gz` that is not gzip, a
`.parquet` that is not Parquet) raises `BadShard`, a one-line error naming it: training on its bytes as text would
be silently wrong. `.jsonl.zst` needs the `zstandard` package (`pip install 'effarch[zstd]'`).
"""

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
SKIP_REASONS = ("missing_field", "not_string", "invalid_utf8")
PARQUET_BATCH_ROWS = 256  # rows decoded into Python objects at a time (not a whole row group's)


class BadShard(ValueError):
    """A corpus file that is not what its suffix says."""


def is_record_file(name: str) -> bool:
    """Whether a file (by its name) holds many documents, one per record."""
    return name.endswith(SUFFIXES)


def read_records(path: Path, field: str) -> Iterator[tuple[int, bytes | str]]:
    """(record index, its text as UTF-8 bytes) for each record of the file, or (index, the reason from SKIP_REASONS)
    for a record that is not a document. The index of a `.jsonl` record is its line number from 0 (blank lines
    hold no record); of a Parquet record, its row."""
    if str(path).endswith(".parquet"):
        yield from _parquet_records(path, field)
    else:
        yield from _jsonl_records(path, field)


def _text(value) -> bytes | str:
    if value is None:
        return "missing_field"
    if isinstance(value, bytes):  # a Parquet binary column
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
        return value
    if not isinstance(value, str):
        return "not_string"
    try:  # lone surrogates: a JSON "\ud800" escape, or invalid UTF-8 bytes read with surrogateescape
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8"


def _open_jsonl(path: Path):
    name = str(path)
    if name.endswith(".gz"):
        return gzip.open(path, "rb"), "gzip"
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise BadShard(f"data.text.source: {path} needs the zstandard package: pip install 'effarch[zstd]'"
                           ) from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                            closefd=True)), "zstd"
    return open(path, "rb"), None


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _jsonl_records(path: Path, field: str) -> Iterator[tuple[int, bytes | str]]:
    f, codec = _open_jsonl(path)
    errors = _decompress_errors() if codec else ()
    with f:
        lines = iter(f)
        i = -1
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except errors as e:
                raise BadShard(f"data.text.source: {path} is not a {codec} file ({type(e).__name__}: {e})") from None
            i += 1
            if not line.strip():
                continue
            text = line.decode("utf-8", "surrogateescape")
            if i == 0:  # a byte order mark, which some writers put first
                text = text.removeprefix("\ufeff")
            try:  # invalid UTF-8 survives as lone surrogates, so only the text field's decides about a record
                record = json.loads(text)
            except ValueError as e:
                raise BadShard(f"data.text.source: {path} line {i + 1} is not JSON ({e}); a .jsonl file holds one "
                               "JSON object per line") from None
            yield i, _text(record.get(field) if isinstance(record, dict) else None)


def _parquet_records(path: Path, field: str) -> Iterator[tuple[int, bytes | str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BadShard(f"data.text.source: {path} is not a Parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        for i in range(pf.metadata.num_rows):
            yield i, "missing_field"
        return
    kind = schema.field(field).type
    # Strings are read as bytes: Arrow does not check UTF-8 when it reads Parquet, _text does.
    as_bytes = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}.get(kind)
    textual = as_bytes is not None or kind in (pa.binary(), pa.large_binary())
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            column = batch.column(0)
            if as_bytes is not None:
                column = column.cast(as_bytes)
            for value in column.to_pylist():
                yield i, _text(value) if textual or value is None else "not_string"
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise BadShard(f"data.text.source: {path} is not a readable Parquet file ({e})") from None
