"""Smoke test of benchmarks/data_pipeline.py on a small temp corpus: the report's numbers are real measurements."""

import json

from tests.benchmarks.test_based_benchmarks import _load


def test_data_pipeline_report(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document {i}\n" * (40 + 10 * i))
    out = tmp_path / "report.json"
    report = _load("data_pipeline").main(["--source", str(corpus), "--batch-size", "4", "--seq-len", "16",
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
    assert report["prepare_cached_s"] < report["build_cold_s"]  # the cache is read, not rebuilt
    assert report["batch_shapes"] == [[4, 16], [4, 16]]
    # One masked label per document (after its separator) plus the last window's pads.
    assert 0 < report["labels_masked_fraction"] < 0.1
