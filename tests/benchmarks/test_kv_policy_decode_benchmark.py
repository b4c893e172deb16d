"""Smoke test of benchmarks/kv_policy_decode.py at a tiny size (contexts 64 and 128, two policies, two steps): the
report's keys, a PNG beside the JSON, positive times; never the timings themselves (the policies' own tests check
what they read). Slow: one prefill and one decode compile per (policy, context)."""

import pytest

from tests.helpers.benchmarks import load_benchmark


@pytest.mark.slow
def test_report_at_a_tiny_size(tmp_path):
    bench = load_benchmark("kv_policy_decode")
    out = tmp_path / "r.json"
    report = bench.main(["--contexts", "64", "128", "--policies", "full", "quest_every8", "--budget", "32", "--chunk",
                         "64", "--steps", "2", "--warmup", "1", "--d-model", "32", "--heads", "4", "--out", str(out)])
    assert out.exists() and out.with_suffix(".png").stat().st_size > 0
    for policy in ("full", "quest_every8"):
        assert set(report["results"][policy]) == {"64", "128"}
        times = report["results"][policy].values()
        assert all(r["median_us"] > 0 and r["mean_us"] > 0 and r["min_us"] > 0 for r in times)
        summary = report["summary"][policy]
        assert summary["ratio_longest_to_shortest"] > 0 and summary["mean_ratio"] > 0
    assert report["summary"]["full"]["flat"] is False  # the full cache is the ceiling, never "flat"
    assert report["other_load_cores"] is None or report["other_load_cores"] >= 0
