"""Smoke test of benchmarks/kernels.py (the GPU kernel benchmark) on CPU: the sweep runs end to end at tiny sizes
with the Pallas kernels interpreted, the kernels agree with the XLA paths on the benchmark's own inputs, cuDNN is
recorded as skipped off GPU, and the derived numbers (FLOPs, speedups, targets) follow from the measurements.
Timings themselves are not checked (2 shared CPU cores)."""

import json

import pytest

from effarch.pallas_kernels.interpret import ENV_VAR
from tests.helpers.benchmarks import load_benchmark


def test_flop_and_byte_counts():
    bench = load_benchmark("kernels")
    # Lightning fwd, 2 chunks of 32, K = V = 16: per chunk 2·32²·32 + 4·32·16·16 = 98,304.
    assert bench.flops("lightning", "fwd", 1, 64, 1, 16, 16, 32) == 2 * 98_304
    # fwd_bwd adds 6·32²·32 + 10·32·16·16 per chunk.
    assert bench.flops("lightning", "fwd_bwd", 1, 64, 1, 16, 16, 32) == 2 * (98_304 + 196_608 + 81_920)
    # A partial chunk counts as a whole one (the kernels pad it).
    assert bench.flops("lightning", "fwd", 1, 65, 1, 16, 16, 32) == 3 * 98_304
    assert bench.flops("softmax", "fwd", 2, 8, 3, 4, 4, 32) == 4 * 2 * 3 * 64 / 2 * 4
    # q, k, v in and o out, bf16: [1, 64, 1, 16] each.
    assert bench.min_bytes("fwd", 1, 64, 1, 16, 16, 2) == 4 * 64 * 16 * 2


def test_dry_run_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "1")
    bench = load_benchmark("kernels")
    out = tmp_path / "kernels.json"
    # fwd_bwd only (the fwd pieces are in it); the fwd mode is the same code path with a different jitted function.
    report = bench.main(["--dry-run", "--lengths", "64", "--modes", "fwd_bwd", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert set(report) == {"config", "records", "speedups", "targets", "load"}
    assert report["config"]["lengths"] == [64] and report["config"]["dtype"] == "bfloat16"

    by_key = {(r["op"], r["path"], r["mode"]): r for r in report["records"]}
    assert set(by_key) == {(op, path, "fwd_bwd") for op in ("lightning", "based") for path in ("xla", "pallas_gpu")
                           } | {("softmax", "cudnn", "fwd_bwd")}
    for (op, path, mode), r in by_key.items():
        if op == "softmax":
            assert "needs a GPU" in r["skipped"] and "median_s" not in r
            continue
        assert "error" not in r and "skipped" not in r, r
        assert r["median_s"] > 0 and r["tflops"] > 0 and r["tb_s"] > 0
        if path == "pallas_gpu":
            # Same bf16 inputs, both round to bf16: the kernel's outputs (and gradients) match XLA's to a bf16 ulp.
            assert r["max_rel_err_vs_xla"] <= 2.0**-7, (op, mode, r["max_rel_err_vs_xla"])
    for op in ("lightning", "based"):
        for mode in ("fwd_bwd",):
            ratio = by_key[(op, "xla", mode)]["median_s"] / by_key[(op, "pallas_gpu", mode)]["median_s"]
            assert report["speedups"][op][mode]["64"] == {"vs_xla": pytest.approx(ratio)}
        target = report["targets"][f"{op}_fwd_bwd_vs_xla_at_64"]
        assert target["pass"] == (target["ratio"] >= bench.TARGET_VS_XLA)
        # No cuDNN off GPU: that target is unmeasured, not failed.
        assert report["targets"][f"{op}_fwd_bwd_vs_cudnn_at_64"] == {"ratio": None, "bound": 10.0, "pass": None}
