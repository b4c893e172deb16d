"""Smoke test of benchmarks/based_cpu.py: runs end to end at tiny sizes; the report's errors are real checks.

The fla half needs a Python with torch, einops and fla-core, which the project venv does not have: it runs when
EFFARCH_FLA_PYTHON names one (e.g. /work/venv311/bin/python) and is skipped otherwise.
"""

import json
import os

import pytest

from tests.helpers.benchmarks import load_benchmark

ARGV = [
    "--lengths",
    "48",
    "--heads",
    "3",
    "--feature-dim",
    "5",
    "--value-dim",
    "6",
    "--chunk-size",
    "16",
    "--reps",
    "2",
    "--warmup",
    "1",
    "--burst",
    "1",
]


def _check_xla(record):
    # Our path against the quadratic oracle on the benchmark's own inputs: float32 errors, not a layout mismatch.
    errs = record["xla"]["rel_err_vs_reference"]
    assert set(errs) == {"loss", "dq", "dk", "dv"} and max(errs.values()) <= 1e-5, errs
    assert len(record["xla"]["times_s"]) == 2 and min(record["xla"]["times_s"]) > 0
    assert record["xla"]["median_s"] == pytest.approx(sum(record["xla"]["times_s"]) / 2)


def test_based_cpu_ours_only_writes_report(tmp_path, capsys):
    bench = load_benchmark("based_cpu")
    out = tmp_path / "based_cpu.json"
    report = bench.main([*ARGV, "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert set(report) == {"config", "results", "load"}
    assert report["config"]["lengths"] == [48] and report["config"]["chunk_size"] == 16
    assert set(report["results"]) == {"48"} and set(report["results"]["48"]) == {"xla"}
    _check_xla(report["results"]["48"])


@pytest.mark.skipif(not os.environ.get("EFFARCH_FLA_PYTHON"), reason="EFFARCH_FLA_PYTHON (torch + fla-core) not set")
def test_based_cpu_against_fla_naive_chunk():
    bench = load_benchmark("based_cpu")
    report = bench.main(
        [*ARGV, "--fla-python", os.environ["EFFARCH_FLA_PYTHON"], "--fla-chunk-size", "16", "--fla-threads", "1",
         "--fla-malloc", "default"]
    )
    record = report["results"]["48"]
    _check_xla(record)
    # fla's naive_chunk_based gets the same inputs (head-major): it computes the same function, or the layout is off.
    fla = record["fla_naive_chunk_1t"]
    assert max(fla["rel_err_vs_reference"].values()) <= 1e-5, fla["rel_err_vs_reference"]
    assert len(fla["times_s"]) == 2 and min(fla["times_s"]) > 0
    assert record["fastest_fla"] == "fla_naive_chunk_1t"
    assert record["fla_over_xla"] == pytest.approx(fla["median_s"] / record["xla"]["median_s"])
    target = report["targets"]["xla_vs_fla_naive_chunk"]
    assert target["speedups"] == {"48": record["fla_over_xla"]}
    assert target["pass"] == (record["fla_over_xla"] >= bench.TARGET_SPEEDUP)
    assert report["config"]["fla"]["fla_naive_chunk_1t"]["threads"] == 1


def test_based_cpu_rejects_lengths_fla_cannot_chunk():
    bench = load_benchmark("based_cpu")
    with pytest.raises(ValueError, match="divisible by --fla-chunk-size=256"):
        bench.run([48], fla_python="unused-python")
