"""Smoke test of benchmarks/moa_vs_window.py on a tiny MQAR run: the report's keys, the plan within its budget, the
four variants evaluated on the same held-out tokens."""

import json
from pathlib import Path

import pytest

from tests.helpers.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


# Trains a tiny run, searches, converts and evaluates four runs (~40 s on 2 cores): the slow suite.
@pytest.mark.slow
def test_moa_vs_window_report(tmp_path):
    from effarch.train.config import load_config
    from effarch.train.train import train_and_evaluate

    run = tmp_path / "run"
    train_and_evaluate(load_config([ROOT / "configs" / "mqar" / "zoology_attention.yaml",
                                    ROOT / "configs" / "overlays" / "tiny.yaml"],
                                   [f"train.run_dir={run}", "train.async_checkpoint=false",
                                    "model.attention.n_heads=2", "train.steps=2"]))
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
