"""Smoke test of benchmarks/lightning_scaling.py: the sweep runs end to end at tiny sizes and its JSON report has
the documented keys. Timings are not checked (2 shared CPU cores)."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark


def test_main_writes_report_with_expected_keys(tmp_path, capsys):
    bench = load_benchmark("lightning_scaling")
    out = tmp_path / "report.json"
    argv = ["--lengths", "128", "256", "--budget", "512", "--heads", "3", "--head-dim", "16", "--block-size", "32",
            "--reps", "1", "--warmup", "1", "--out", str(out)]
    report = bench.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert set(report) == {"config", "results", "ratios", "skipped", "targets", "load"}
    assert report["config"]["lengths"] == [128, 256]
    assert report["config"]["budget_tokens"] == 512
    assert set(report["results"]) == {"lightning_xla", "softmax_xla"}
    for path, per_t in report["results"].items():
        assert set(per_t) == {"128", "256"}
        for t, record in per_t.items():
            # batch = budget // T: every length processes the same number of tokens.
            assert record["batch"] == 512 // int(t) and record["tokens"] == 512
            assert {"tokens_per_s", "median_s", "times_s", "memory", "compile_s"} <= set(record)
            assert record["tokens_per_s"] > 0 and len(record["times_s"]) == 1
            memory = record["memory"]
            assert set(memory) == {"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "peak_bytes"}
            # q, k, v and the cotangent, float32 [B, T, H, K], are the arguments.
            assert memory["argument_bytes"] == 4 * 512 * 3 * 16 * 4
            assert memory["peak_bytes"] >= memory["argument_bytes"]
        assert report["ratios"][path]["128"] == 1.0 and report["ratios"][path]["256"] > 0
        assert report["skipped"][path] == {}
    assert set(report["targets"]) == {
        "lightning_tokens_per_s_flat",
        "lightning_peak_memory_flat",
        "softmax_tokens_per_s_falls",
    }
    # Each verdict is recomputed from the report's own measurements: a target that ignored them would fail here.
    light, soft, targets = report["results"]["lightning_xla"], report["results"]["softmax_xla"], report["targets"]
    speed = light["256"]["tokens_per_s"] / light["128"]["tokens_per_s"]
    assert targets["lightning_tokens_per_s_flat"]["ratio"] == pytest.approx(speed)
    assert targets["lightning_tokens_per_s_flat"]["pass"] == (speed >= 1 - bench.LIGHTNING_SPEED_TOLERANCE)
    peaks = [r["memory"]["peak_bytes"] for r in light.values()]
    spread = max(peaks) / min(peaks) - 1
    assert targets["lightning_peak_memory_flat"]["max_over_min_minus_1"] == pytest.approx(spread)
    assert targets["lightning_peak_memory_flat"]["pass"] == (spread <= bench.LIGHTNING_MEMORY_TOLERANCE)
    falls = soft["256"]["tokens_per_s"] < soft["128"]["tokens_per_s"]
    assert targets["softmax_tokens_per_s_falls"]["pass"] == falls


def test_softmax_over_memory_cap_is_skipped_not_run():
    bench = load_benchmark("lightning_scaling")
    # A cap of ~0 bytes: softmax is compiled for its memory numbers but never timed; Lightning is unaffected.
    report = bench.run([128], budget=256, heads=3, head_dim=16, block_size=32, reps=1, softmax_max_gib=1e-9)
    soft = report["results"]["softmax_xla"]["128"]
    assert "tokens_per_s" not in soft and soft["memory"]["temp_bytes"] > 0
    assert "128" in report["skipped"]["softmax_xla"] and "softmax_xla" not in report["ratios"]
    assert "tokens_per_s" in report["results"]["lightning_xla"]["128"]
    assert "softmax_tokens_per_s_falls" not in report["targets"]
