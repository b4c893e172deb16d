"""Cost of the text data pipeline (data.task: text): building the TFDS corpus, packing it, and serving batches.

Measured in one process on a fresh data directory: the cold build of the corpus (files -> array_record), a cached
`prepare`, `build_data` (read, tokenize, pack both splits), then the latency of `stream.batch(step)` (Grain
MapDataset, shuffled per epoch) against the baseline of the same windows served from an in-memory array by the
MQAR/bytes tasks' `TrainStream`, in the same run. A batch must cost far less than a training step (the quickstart's
is 1.4-2.1 s on 2 loaded CPU cores) for the loop's prefetch thread to hide it.

    .venv/bin/python benchmarks/data_pipeline.py [--source python_stdlib] [--batch-size 16] [--seq-len 256]
        [--steps 200] [--out FILE]

`--scale-mb 100 500 2000 [--png FILE]` measures instead how memory grows with the corpus: for each size a corpus of
generated text is written, then a fresh process prepares it (array_record, `local_text.prepare`) and measures its
peak resident memory, and another fresh process measures its own resident memory (VmRSS / peak VmHWM from /proc,
the peak reset after the imports; RssAnon and RssFile at the end: file pages are page cache) across `build_data`
(the one-time offsets pass included), a second `build_data` from the cached offsets, and `--steps` batches, and the
batches per second on one thread against the train step's need (`--step-s`, one batch per step). Writes the JSON
(with the load average before and after) and a PNG of resident memory against corpus size. A corpus needs about
twice its size in free disk (the text files and the array_record copy) under `--work-dir` (default: a temporary
directory); each is deleted before the next size.

`--records-mb 100 [--shard-mb 64] [--records-format jsonl]` measures the builder on a sharded document corpus: a
generated JSONL corpus of about that many MB (documents of 0.5-8 KB as {"id", "url", "text"} records, like FineWeb's
shards; `jsonl.zst` or `parquet` shards with --records-format) is written under `--work-dir`, then a fresh process
prepares it and reports records per second, MB of text per second and its peak resident memory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LoadGate, emit


def _latencies(fn, steps: int) -> list[float]:
    out = []
    for s in range(steps):
        t0 = time.perf_counter()
        fn(s)
        out.append(time.perf_counter() - t0)
    return out


def _proc_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (VmRSS: resident now; VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_corpus(root: Path, n_bytes: int, seed: int = 0) -> int:
    """Generated text documents of 4-64 KB (words of a fixed vocabulary, lines of 8-16 words) under `root`, about
    n_bytes in all, 1000 files per folder; returns the bytes written."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
                      for _ in range(5000)])
    # One long text drawn once; documents are slices of it from random offsets, so writing 2 GB costs only I/O.
    words = vocab[rng.integers(0, len(vocab), 400_000)]
    ends = np.cumsum(rng.integers(8, 17, len(words) // 8))
    words[ends[ends < len(words)]] = "\n"
    base = " ".join(words).replace(" \n ", "\n").encode()
    written, i = 0, 0
    while written < n_bytes:
        size = min(int(rng.integers(4096, 65536)), n_bytes - written)
        start = int(rng.integers(0, len(base) - size))
        folder = root / f"{i // 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.txt").write_bytes(base[start : start + size])
        written, i = written + size, i + 1
    return written


def write_record_corpus(root: Path, n_bytes: int, shard_bytes: int, fmt: str = "jsonl", seed: int = 0) -> dict:
    """Shards of {"id", "url", "text"} records under `root`, about n_bytes of JSONL in all (documents of 0.5-8 KB
    of generated words), `shard_bytes` a shard; returns {"records", "text_bytes", "file_bytes", "shards"}."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
                      for _ in range(5000)])
    base = " ".join(vocab[rng.integers(0, len(vocab), 400_000)])
    root.mkdir(parents=True, exist_ok=True)
    stats = {"records": 0, "text_bytes": 0, "file_bytes": 0, "shards": 0}
    written = 0
    while written < n_bytes:
        rows, size = [], 0
        while size < shard_bytes and written + size < n_bytes:
            n = int(rng.integers(512, 8192))
            start = int(rng.integers(0, len(base) - n))
            i = stats["records"] + len(rows)
            rows.append({"id": i, "url": f"https://example.com/{i}", "text": base[start : start + n]})
            size += n + 60
        path = root / f"shard-{stats['shards']:05d}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            if fmt == "jsonl.zst":
                import zstandard

                data = zstandard.ZstdCompressor().compress(data)
            path.write_bytes(data)
        stats["records"] += len(rows)
        stats["text_bytes"] += sum(len(r["text"]) for r in rows)
        stats["file_bytes"] += path.stat().st_size
        stats["shards"] += 1
        written += size
    return stats


def records(args) -> dict:
    """--records-mb: the builder's records per second on a generated sharded corpus, prepared in a fresh process."""
    gate = LoadGate()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        corpus, data_dir = Path(work) / "corpus", Path(work) / "tfds"
        t0 = time.perf_counter()
        corpus_stats = write_record_corpus(corpus, int(args.records_mb * 1e6), int(args.shard_mb * 1e6),
                                           args.records_format)
        generate_s = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--measure", "prepare", "--source", str(corpus), "--data-dir", str(data_dir)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        prepared = json.loads(out.stdout.strip().splitlines()[-1])
    report = {
        "benchmark": "data_pipeline_records",
        "config": {"records_mb": args.records_mb, "shard_mb": args.shard_mb, "format": args.records_format,
                   "cpu_count": os.cpu_count()},
        "corpus": corpus_stats, "generate_s": generate_s, **prepared,
        "records_per_s": corpus_stats["records"] / prepared["prepare_s"],
        "text_mb_per_s": corpus_stats["text_bytes"] / 1e6 / prepared["prepare_s"],
        "file_mb_per_s": corpus_stats["file_bytes"] / 1e6 / prepared["prepare_s"],
    }
    return emit(gate.stamp(report), args.out)


def _reset_peak() -> None:
    """Resets VmHWM to the current resident set (Linux >= 4.0), so the peak read later is the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _prepare_child(args) -> dict:
    """In a fresh process: the time and peak resident memory of preparing the corpus (files -> array_record)."""
    from effarch.train.data import local_text

    rss_imports = _proc_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    builder = local_text.prepare(args.source, args.data_dir)
    return {"prepare_s": time.perf_counter() - t0, "prepare_rss_after_imports_mib": rss_imports / 1024,
            "prepare_rss_peak_mib": _proc_kib("VmHWM") / 1024,
            "prepare_shards": {k: v.num_shards for k, v in builder.info.splits.items()},
            "prepare_documents": sum(v.num_examples for v in builder.info.splits.values()),
            "array_record_bytes": sum(p.stat().st_size for p in Path(builder.data_dir).glob("*.array_record-*"))}


def _measure_child(args) -> dict:
    """In a fresh process: the train side's memory and speed on a prepared corpus (see --scale-mb)."""
    from effarch.train.config import DataConfig, TextData
    from effarch.train.data import build_data

    cfg = DataConfig(task="text", data_dir=args.data_dir, seq_len=args.seq_len,
                     text=TextData(source=args.source, max_bytes=args.max_bytes))
    rss_imports = _proc_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    stream, _ = build_data(cfg, vocab_size=257, batch_size=args.batch_size)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream, _ = build_data(cfg, vocab_size=257, batch_size=args.batch_size)
    cached = time.perf_counter() - t0
    n = len(stream.windows) // args.batch_size
    steps = [int(s) for s in np.random.default_rng(0).integers(0, 10 * n, args.steps)]  # spread over 10 epochs
    t0 = time.perf_counter()
    for s in steps:
        stream.batch(s)
    serve = time.perf_counter() - t0
    return {"train_tokens": stream.windows.n_tokens, "train_windows": len(stream.windows),
            "documents": len(stream.windows.ends), "rss_after_imports_mib": rss_imports / 1024,
            "rss_end_mib": _proc_kib("VmRSS") / 1024, "rss_peak_mib": _proc_kib("VmHWM") / 1024,
            # Resident file pages (a memory-mapped array_record or offsets file) are page cache the kernel can drop;
            # anonymous memory is what the process holds.
            "rss_anon_end_mib": _proc_kib("RssAnon") / 1024, "rss_file_end_mib": _proc_kib("RssFile") / 1024,
            "build_data_first_s": first, "build_data_cached_s": cached, "batches_per_s": args.steps / serve}


def _plot(report: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["sizes"]
    mb = [r["corpus_mb"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(mb, [r["rss_peak_mib"] for r in rows], "o-", label="peak resident (VmHWM)")
    ax.plot(mb, [r["rss_end_mib"] for r in rows], "s--", label="resident after the batches")
    ax.plot(mb, [r["rss_anon_end_mib"] for r in rows], "^-.", label="  of which anonymous (not file pages)")
    ax.plot(mb, [r["rss_after_imports_mib"] for r in rows], ":", color="gray", label="after the imports")
    ax.plot(mb, [r["prepare_rss_peak_mib"] for r in rows], "D-", label="peak resident while preparing the corpus")
    # For scale: what holding the text alone would add (the train split was once held as int32 tokens, 4x this).
    ax.plot(mb, [r["rss_after_imports_mib"] + r["corpus_bytes"] / 2**20 for r in rows], "--", color="lightgray",
            label="after the imports + the corpus's bytes")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xticks(mb)
    ax.set_xlabel("corpus size (MB of text)")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, 1.15 * max(max(r["rss_peak_mib"], r["prepare_rss_peak_mib"],
                                  r["rss_after_imports_mib"] + r["corpus_bytes"] / 2**20) for r in rows))
    ax.set_title(f"text task: prepare, then train side (batch {report['config']['batch_size']} x "
                 f"{report['config']['seq_len']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scale(args) -> dict:
    """--scale-mb: one corpus per size, prepared in a fresh process and measured in another."""
    rows, gate = [], LoadGate()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for mb in args.scale_mb:
            corpus, data_dir = Path(work) / f"corpus_{mb}", Path(work) / f"tfds_{mb}"
            n_bytes = write_corpus(corpus, int(mb * 1e6))
            row = {"corpus_mb": mb, "corpus_bytes": n_bytes}
            for what in ("prepare", "train"):
                cmd = [sys.executable, __file__, "--measure", what, "--source", str(corpus), "--data-dir",
                       str(data_dir), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                       "--steps", str(args.steps), "--max-bytes", str(2 * n_bytes)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr)
            for path in (corpus, data_dir):  # free the disk before the next size
                subprocess.run(["rm", "-rf", str(path)], check=True)
    need = 1.0 / args.step_s
    report = {
        "benchmark": "data_pipeline_scale",
        "config": {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                   "step_s": args.step_s, "cpu_count": os.cpu_count()},
        "sizes": rows,
        "rss_peak_growth_mib": rows[-1]["rss_peak_mib"] - rows[0]["rss_peak_mib"],
        "prepare_rss_peak_growth_mib": rows[-1]["prepare_rss_peak_mib"] - rows[0]["prepare_rss_peak_mib"],
        "step_need_batches_per_s": need,
        "min_batches_per_s_over_need": min(r["batches_per_s"] for r in rows) / need,
    }
    if args.png:
        _plot(report, args.png)
    return emit(gate.stamp(report), args.out)


def _files(directory) -> dict[str, tuple[int, int]]:
    """{name: (inode, modification time in ns)} of a prepared dataset's files: any rewrite changes one of them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(directory).iterdir()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="python_stdlib", help="data.text.source")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--steps", type=int, default=200, help="batches timed per path")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--scale-mb", type=float, nargs="+", help="corpus sizes (MB): memory against corpus size")
    p.add_argument("--png", help="--scale-mb: the plot of resident memory against corpus size")
    p.add_argument("--step-s", type=float, default=1.4, help="--scale-mb: the train step the batches must keep up "
                   "with (the quickstart's on 2 loaded cores)")
    p.add_argument("--work-dir", help="--scale-mb, --records-mb: where the generated corpora are written (default: "
                   "$TMPDIR)")
    p.add_argument("--records-mb", type=float, help="size (MB) of a generated sharded JSONL corpus: builder records/s")
    p.add_argument("--shard-mb", type=float, default=64, help="--records-mb: MB per shard")
    p.add_argument("--records-format", choices=["jsonl", "jsonl.zst", "parquet"], default="jsonl",
                   help="--records-mb: the shards' format")
    p.add_argument("--measure", choices=["prepare", "train"], help=argparse.SUPPRESS)  # the children of --scale-mb
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        result = (_prepare_child if args.measure == "prepare" else _measure_child)(args)
        print(json.dumps(result))
        return result
    if args.scale_mb:
        return scale(args)
    if args.records_mb:
        return records(args)

    from effarch.train.config import DataConfig, TextData
    from effarch.train.data import TrainStream, build_data, local_text
    from effarch.train.data.labels import IGNORE_LABEL

    gate = LoadGate()
    with tempfile.TemporaryDirectory() as data_dir:
        cfg = DataConfig(task="text", data_dir=data_dir, seq_len=args.seq_len,
                         text=TextData(source=args.source, max_bytes=args.max_bytes))
        t0 = time.perf_counter()
        builder = local_text.prepare(cfg.text.source, data_dir, cfg.text.val_fraction)
        cold = time.perf_counter() - t0
        written = _files(builder.data_dir)
        t0 = time.perf_counter()
        local_text.prepare(cfg.text.source, data_dir, cfg.text.val_fraction)
        warm = time.perf_counter() - t0
        rebuilt = _files(builder.data_dir) != written
        t0 = time.perf_counter()
        stream, (val,) = build_data(cfg, vocab_size=257, batch_size=args.batch_size)
        build = time.perf_counter() - t0
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}

    x, y = stream.windows.all()
    baseline = TrainStream(x, y, args.batch_size, seed=0)
    grain_s = _latencies(stream.batch, args.steps)
    numpy_s = _latencies(baseline.batch, args.steps)
    a, b = stream.batch(args.steps), baseline.batch(args.steps)
    report = {
        "benchmark": "data_pipeline",
        "config": {"source": args.source, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "max_bytes": args.max_bytes, "steps": args.steps},
        "corpus": {"documents": splits, "train_tokens": stream.windows.n_tokens,
                   "train_windows": len(stream.windows), "eval_windows": int(len(val.inputs)),
                   "eval_bytes_per_label": val.bytes_per_label},
        "build_cold_s": cold,
        "prepare_cached_s": warm,
        "prepare_cached_rebuilt": rebuilt,  # whether the second prepare wrote the files again (it should read them)
        "build_data_s": build,
        "grain_batch_ms_median": 1e3 * statistics.median(grain_s),
        "numpy_batch_ms_median": 1e3 * statistics.median(numpy_s),
        "grain_over_numpy": statistics.median(grain_s) / statistics.median(numpy_s),
        "grain_batches_per_s": 1.0 / statistics.median(grain_s),
        "batch_shapes": [list(a[0].shape), list(b[0].shape)],
        "labels_masked_fraction": float(np.mean(y == IGNORE_LABEL)),  # separators and pads, over all train windows
    }
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
