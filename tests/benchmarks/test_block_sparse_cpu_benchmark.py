"""Smoke test of benchmarks/block_sparse_cpu.py at tiny lengths: the report's keys, the PNG beside the JSON, and the
dense path compiled but not run past its memory cap. Timings are not checked (2 shared CPU cores)."""

import json

import jax
import numpy as np
import pytest

from tests.helpers.benchmarks import load_benchmark


@pytest.mark.slow  # a benchmark smoke test of several seconds: the slow suite (the default suite's 10-minute budget)
def test_report_png_and_memory_cap(tmp_path):
    bench = load_benchmark("block_sparse_cpu")
    out = tmp_path / "r.json"
    report = bench.main(["--lengths", "256", "512", "--heads", "2", "--head-dim", "16", "--reps", "1", "--warmup",
                         "0", "--dense-max-gib", "1e-6", "--out", str(out)])
    assert {"results", "speedup", "loaded", "target", "skipped"} <= set(report)
    assert json.loads(out.read_text())["results"].keys() == {"256", "512"}
    assert set(report["skipped"]) == {256, 512} or set(report["skipped"]) == {"256", "512"}
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(report["speedup"]["256"]) == {"dense_xla", "dense_xla_chunked", "time"}


@pytest.mark.slow  # a benchmark smoke test of several seconds: the slow suite (the default suite's 10-minute budget)
def test_dense_chunked_is_dense_causal_attention():
    """The chunked dense baseline computes the same thing as one dense call, values and gradients."""
    bench = load_benchmark("block_sparse_cpu")
    q, k, v, ct = (jax.random.normal(key, (1, 96, 2, 8)) for key in jax.random.split(jax.random.key(0), 4))
    dense = bench.loss_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    chunked = bench.loss_and_grads(lambda q, k, v: bench.dense_chunked(q, k, v, chunk=32))
    for a, b in zip(jax.tree.leaves(dense(q, k, v, ct)), jax.tree.leaves(chunked(q, k, v, ct)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
