"""Smoke test of benchmarks/block_sparse_gpu.py (the block-sparse kernel's GPU check) on CPU: the dry run goes end to
end with the kernel interpreted, its correctness check passes, its lists are causal at the asked density, and cuDNN
is recorded as skipped off GPU. Timings are not checked (2 shared CPU cores)."""

import json

import numpy as np
import pytest

from effarch.pallas_kernels.interpret import ENV_VAR
from tests.helpers.benchmarks import load_benchmark


def test_lists_are_causal_at_the_density():
    idx, cnt = (np.asarray(x) for x in load_benchmark("block_sparse_gpu").causal_lists(1, 2, 40, 0.1))
    assert idx.shape == (1, 2, 40, 4) and (cnt == np.minimum(np.arange(40) + 1, 4)).all()
    for g, i in np.ndindex(2, 40):
        listed = idx[0, g, i, : cnt[0, g, i]]
        assert i in listed and (listed <= i).all() and len(set(listed)) == len(listed)


@pytest.mark.slow  # interprets the kernel's forward and backward twice (~20 s on a busy host)
def test_dry_run_report(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    out = tmp_path / "block_sparse.json"
    report = load_benchmark("block_sparse_gpu").main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["check"]["passed"]
    assert report["speed"]["times_s"]["dense/cudnn"] == {"skipped": "needs a GPU"}
    assert report["speed"]["times_s"]["pallas_gpu"]["median"] > 0
