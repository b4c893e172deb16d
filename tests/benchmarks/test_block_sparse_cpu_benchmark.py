"""Smoke test of benchmarks/block_sparse_cpu.py at tiny lengths: the report's keys, the PNG beside the JSON, and the
dense path compiled but not run past its memory cap. Timings are not checked (2 shared CPU cores)."""

import json

from tests.helpers.benchmarks import load_benchmark


def test_report_png_and_memory_cap(tmp_path):
    bench = load_benchmark("block_sparse_cpu")
    out = tmp_path / "r.json"
    report = bench.main(["--lengths", "256", "512", "--heads", "2", "--head-dim", "16", "--reps", "1", "--warmup",
                         "0", "--dense-max-gib", "1e-6", "--out", str(out)])
    assert {"results", "speedup", "loaded", "target", "skipped"} <= set(report)
    assert json.loads(out.read_text())["results"].keys() == {"256", "512"}
    assert set(report["skipped"]) == {256, 512} or set(report["skipped"]) == {"256", "512"}
    assert out.with_suffix(".png").stat().st_size > 0
