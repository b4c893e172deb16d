"""Smoke test of benchmarks/sparse_selection.py at a tiny size (T = 128, blocks of 16): the report's keys, lists of
k = 1 block per row at density 0.1 over 8 blocks (SeerAttention's rule: int(0.051 · 8) = 0, at least 1), and the
overhead a positive ratio for every policy; never the timings themselves. Slow: fourteen compiles (the policies'
layer tests cover what they compute)."""

import pytest

from tests.helpers.benchmarks import load_benchmark


@pytest.mark.slow
def test_report_at_a_tiny_size(tmp_path):
    bench = load_benchmark("sparse_selection")
    report = bench.main(["--seq-len", "128", "--block", "16", "--reps", "1", "--kv-heads", "2",
                         "--hyper-min-len", "32", "--routing-clusters", "4", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists()
    for pattern, lists in (("mean_topk", 2 * 8), ("seer", 4 * 8), ("hip", 2 * 8)):  # per KV head / per query head
        r = report["results"][pattern]
        assert set(r["median_s"]) == {"select", "op", "total"} and r["select_over_op"] > 0
        assert (r["list_width"], r["lists"]) == (1, lists)
        assert abs(r["block_density"] - 8 / 36) < 1e-9  # the diagonal of 8 causal rows of 1..8 blocks
    for pattern in ("routing", "hyper"):
        r = report["results"][pattern]
        assert set(r["median_s"]) == {"select", "op", "total"} and r["select_over_op"] > 0
