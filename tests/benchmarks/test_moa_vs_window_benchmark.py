"""Smoke test of benchmarks/moa_vs_window.py on a tiny MQAR run: the report's keys, the plan within its budget, the
four variants evaluated on the same held-out tokens."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark
from tests.helpers.runs import tiny_mqar_attention_run


# Trains a tiny run, searches, converts and evaluates four runs (~40 s on 2 cores): the slow suite.
@pytest.mark.slow
def test_moa_vs_window_report(tmp_path):
    run = tiny_mqar_attention_run(tmp_path / "run", steps=2)
    out = tmp_path / "report.json"
    report = load_benchmark("moa_vs_window").main(
        ["--run-dir", str(run), "--work-dir", str(tmp_path / "work"), "--density", "0.5", "--block", "4",
         "--calibration-batches", "1", "--max-examples", "16", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"config", "plan", "results", "targets"}
    assert set(report["results"]) == {"dense", "moa", "sink_window", "window"}
    assert len({r["tokens"] for r in report["results"].values()}) == 1
    assert report["config"]["N"] == 32 and report["config"]["uniform_keys_per_query"] == 16
    assert report["plan"]["density_at_N"]["32"] <= 0.5 and len(report["plan"]["spans_at_N"]) == 2
    assert set(report["targets"]) == {"moa_beats_sink_window", "moa_beats_window"}
