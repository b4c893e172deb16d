"""Smoke test of benchmarks/train_loop.py on the tiny model: every variant trains, identically, and is timed."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark


def test_train_loop_variants_agree_and_report_their_speed(tmp_path, capsys):
    bench = load_benchmark("train_loop")
    out = tmp_path / "train_loop.json"
    report = bench.main(["--models", "tiny", "--steps", "12", "--repeats", "2", "--log-every", "5", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert report["backend"] == "cpu" and report["load_avg_1m_before"] >= 0
    tiny = report["models"]["tiny"]
    assert (tiny["d_model"], tiny["batch"], tiny["steps"]) == (32, [8, 32], 12)
    # The four host sides run the same compiled step from the same parameters: the same losses at 5, 10 and the
    # last step, exactly, and a loss near ln(256) (the tiny model barely moves in 12 steps), not NaN.
    assert tiny["losses_identical"] is True and tiny["compared_steps"] == [5, 10, 12]
    assert 4.5 < tiny["final_loss"] < 6.0, tiny["final_loss"]
    results = tiny["results"]
    assert set(results) == {"sync", "sync_prefetch", "deferred", "deferred_prefetch"}
    for r in results.values():
        assert len(r["times_s"]) == 2 and min(r["times_s"]) > 0
        assert r["median_s"] == pytest.approx(sum(r["times_s"]) / 2)
        assert r["steps_per_s"] == pytest.approx(12 / r["median_s"])
        assert r["best_steps_per_s"] == pytest.approx(12 / min(r["times_s"]))
        assert r["best_steps_per_s"] >= r["steps_per_s"]
        assert r["speedup_vs_sync"] == pytest.approx(r["steps_per_s"] / results["sync"]["steps_per_s"])
    assert results["sync"]["speedup_vs_sync"] == 1.0


def test_train_loop_rejects_bad_arguments():
    bench = load_benchmark("train_loop")
    with pytest.raises(SystemExit):
        bench.main(["--models", "tiny", "small", "--steps", "1", "2", "3"])
