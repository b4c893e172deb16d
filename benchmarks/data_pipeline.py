"""Cost of the text data pipeline (data.task: text): building the TFDS corpus, packing it, and serving batches.

Measured in one process on a fresh data directory: the cold build of the corpus (files -> array_record), a cached
`prepare`, `build_data` (read, tokenize, pack both splits), then the latency of `stream.batch(step)` (Grain
MapDataset, shuffled per epoch) against the baseline of the same windows served from an in-memory array by the
MQAR/bytes tasks' `TrainStream`, in the same run. A batch must cost far less than a training step (the quickstart's
is 1.4-2.1 s on 2 loaded CPU cores) for the loop's prefetch thread to hide it.

    .venv/bin/python benchmarks/data_pipeline.py [--source python_stdlib] [--batch-size 16] [--seq-len 256]
        [--steps 200] [--out FILE]
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
from _common import emit


def _latencies(fn, steps: int) -> list[float]:
    out = []
    for s in range(steps):
        t0 = time.perf_counter()
        fn(s)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="python_stdlib", help="data.text_source")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--steps", type=int, default=200, help="batches timed per path")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    from effarch.train.config import DataConfig
    from effarch.train.data import TrainStream, build_data, local_text
    from effarch.train.data.labels import IGNORE_LABEL

    with tempfile.TemporaryDirectory() as data_dir:
        cfg = DataConfig(task="text", text_source=args.source, data_dir=data_dir, seq_len=args.seq_len,
                         max_bytes=args.max_bytes)
        t0 = time.perf_counter()
        builder = local_text.prepare(cfg.text_source, data_dir, cfg.val_fraction)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        local_text.prepare(cfg.text_source, data_dir, cfg.val_fraction)
        warm = time.perf_counter() - t0
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
        "corpus": {"documents": splits, "train_tokens": int(len(stream.windows.tokens)),
                   "train_windows": len(stream.windows), "eval_windows": int(len(val.inputs)),
                   "eval_bytes_per_label": val.bytes_per_label},
        "build_cold_s": cold,
        "prepare_cached_s": warm,
        "build_data_s": build,
        "grain_batch_ms_median": 1e3 * statistics.median(grain_s),
        "numpy_batch_ms_median": 1e3 * statistics.median(numpy_s),
        "grain_over_numpy": statistics.median(grain_s) / statistics.median(numpy_s),
        "grain_batches_per_s": 1.0 / statistics.median(grain_s),
        "batch_shapes": [list(a[0].shape), list(b[0].shape)],
        "labels_masked_fraction": float(np.mean(y == IGNORE_LABEL)),  # separators and pads, over all train windows
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
