"""Smoke test of benchmarks/data_pipeline.py on a small temp corpus: the report's numbers are real measurements."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark


def test_data_pipeline_report(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document {i}\n" * (40 + 10 * i))
    out = tmp_path / "report.json"
    report = load_benchmark("data_pipeline").main(["--source", str(corpus), "--batch-size", "4", "--seq-len", "16",
                                          "--steps", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    docs = report["corpus"]["documents"]
    assert docs["train"] + docs["validation"] == 6 and docs["validation"] >= 1
    text_bytes = sum(len(f"document {i}\n") * (40 + 10 * i) for i in range(6))
    # Train tokens = the train documents' bytes + one separator each, so fewer than all bytes + 6.
    assert 0 < report["corpus"]["train_tokens"] < text_bytes + 6
    assert report["corpus"]["train_windows"] == -(-(report["corpus"]["train_tokens"] - 1) // 16)
    assert report["corpus"]["eval_bytes_per_label"] < 1  # separators are labels that stand for no bytes
    for key in ("build_cold_s", "prepare_cached_s", "build_data_s", "grain_batch_ms_median", "numpy_batch_ms_median"):
        assert report[key] > 0, key
    assert report["prepare_cached_rebuilt"] is False  # the cache is read, not rebuilt (no file written again)
    assert report["batch_shapes"] == [[4, 16], [4, 16]]
    # One masked label per document (after its separator) plus the last window's pads.
    assert 0 < report["labels_masked_fraction"] < 0.1


def test_scale_mode_parts(tmp_path):
    """--scale-mb's parts in this process (the mode runs each in a fresh one): the generated corpus, its preparation,
    the train side's measurement on it, and the plot."""
    bench = load_benchmark("data_pipeline")
    corpus = tmp_path / "corpus"
    assert bench.write_corpus(corpus, 150_000) == 150_000
    sizes = sorted(p.stat().st_size for p in corpus.rglob("*.txt"))
    assert len(sizes) >= 3 and sizes[-2] >= 4096 and sizes[-1] <= 65536  # 4-64 KB documents (the last cut short)
    args = bench.argparse.Namespace(source=str(corpus), data_dir=str(tmp_path / "tfds"), seq_len=64, batch_size=4,
                                    steps=5, max_bytes=300_000)
    prepared = bench._prepare_child(args)
    assert prepared["prepare_rss_peak_mib"] > 0 and prepared["prepare_shards"] == {"train": 1, "validation": 1}
    assert prepared["array_record_bytes"] > 0
    row = {**prepared, **bench._measure_child(args)}
    assert row["train_tokens"] > 100_000 and row["documents"] >= 2
    assert row["rss_peak_mib"] >= row["rss_end_mib"] >= row["rss_anon_end_mib"] > 0 and row["batches_per_s"] > 0
    report = {"config": {"batch_size": 4, "seq_len": 64},
              "sizes": [{"corpus_mb": 0.15, "corpus_bytes": 150_000, **row},
                        {"corpus_mb": 0.3, "corpus_bytes": 300_000, **row}]}
    bench._plot(report, str(tmp_path / "rss.png"))
    assert (tmp_path / "rss.png").stat().st_size > 1000


@pytest.mark.slow
def test_scale_mode_end_to_end(tmp_path):
    out = tmp_path / "scale.json"
    report = load_benchmark("data_pipeline").main(["--scale-mb", "0.2", "0.4", "--steps", "5", "--batch-size", "4",
                                          "--seq-len", "32", "--work-dir", str(tmp_path), "--out", str(out),
                                          "--png", str(tmp_path / "rss.png")])
    assert json.loads(out.read_text()) == report and [r["corpus_mb"] for r in report["sizes"]] == [0.2, 0.4]
    assert report["min_batches_per_s_over_need"] > 1 and (tmp_path / "rss.png").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet"])
def test_records_mode_parts(tmp_path, fmt):
    """--records-mb's parts in this process: the generated shards (every record a document) and their preparation."""
    if fmt == "jsonl.zst":
        pytest.importorskip("zstandard")
    bench = load_benchmark("data_pipeline")
    stats = bench.write_record_corpus(tmp_path / "corpus", 200_000, 80_000, fmt)
    assert stats["shards"] == len(list((tmp_path / "corpus").iterdir())) == 3
    assert 25 <= stats["records"] and stats["text_bytes"] < 200_000
    args = bench.argparse.Namespace(source=str(tmp_path / "corpus"), data_dir=str(tmp_path / "tfds"))
    prepared = bench._prepare_child(args)
    assert prepared["prepare_documents"] == stats["records"] and prepared["prepare_s"] > 0
