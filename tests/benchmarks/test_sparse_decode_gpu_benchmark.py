"""Smoke test of benchmarks/sparse_decode_gpu.py (the decode kernel's GPU check) on CPU: its lists are distinct and
sized by the budget, and the dry run goes end to end with the kernel interpreted and its correctness check passing.
Timings are not checked (2 shared CPU cores)."""

import argparse
import json

import numpy as np
import pytest

from effarch.pallas_kernels.interpret import ENV_VAR
from tests.helpers.benchmarks import load_benchmark


def test_lists_read_the_budget():
    bench = load_benchmark("sparse_decode_gpu")
    args = argparse.Namespace(batch=2, kv_heads=3, budget=256, block=64)
    for granularity, k, n in (("token", 256, 1000), ("block", 4, 1000 // 64)):
        idx, cnt = (np.asarray(x) for x in bench.selection(args, 1000, granularity))
        assert idx.shape == (2, 3, k) and (cnt == k).all()
        assert all(len(set(row)) == k and row.min() >= 0 and row.max() < n for row in idx.reshape(-1, k))


@pytest.mark.slow  # interprets the kernel (token and block lists) and compiles each path (~30 s on a busy host)
def test_dry_run_report(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    out = tmp_path / "sparse_decode.json"
    report = load_benchmark("sparse_decode_gpu").main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["check"]["passed"]
    for entry in report["speed"].values():
        assert entry["times_s"]["pallas_gpu"]["median"] > 0 and entry["max_rel_err_vs_xla"] < 1e-2
