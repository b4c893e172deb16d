"""Smoke test of benchmarks/moh.py at tiny sizes: the report's keys, and the one number that does not depend on the
machine's load: the sparse path's compiled FLOPs fall with the share of active heads, the dense path's do not."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark

TINY = ["--contexts", "40", "--seq-len", "48", "--d-model", "32", "--head-dim", "8", "--block-size", "8",
        "--warmup", "1", "--steps", "1"]


@pytest.mark.slow  # a benchmark smoke test of several seconds: the slow suite (the default suite's 10-minute budget)
def test_sparse_flops_fall_and_decode_record():
    # The pieces main() is made of, at tiny sizes (the full sweep is the slow test below).
    bench = load_benchmark("moh")
    sizes = {"d_model": 32, "heads": 8, "head_dim": 8, "block_size": 8}
    flops = {share: bench.measure_flops(bench._layer("sparse", bench.SHARES[share], **sizes), 48, 0)
             for share in ("100", "50")}
    assert flops["50"]["op_flops"] < 0.65 * flops["100"]["op_flops"], flops
    assert flops["50"]["layer_flops"] < flops["100"]["layer_flops"], flops
    decode = bench.measure_decode(bench._layer("sparse", 2, **sizes), 40, warmup=1, steps=1, seed=0)
    assert decode["op_per_token_s"] > 0 and decode["layer_per_token_s"] > 0
    # The KV cache holds every head (other tokens may pick them): 2 · L · H · K float32.
    assert decode["cache_bytes"] == 2 * 40 * 8 * 8 * 4


@pytest.mark.slow
def test_main_both_paths(tmp_path):
    bench = load_benchmark("moh")
    out = tmp_path / "report.json"
    report = bench.main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"config", "results", "ratios", "targets", "load"}
    for path in ("dense", "sparse"):
        per_share = report["results"][path]
        assert set(per_share) == {"100", "75", "50"}
        assert [per_share[s]["active_heads"] for s in ("100", "75", "50")] == [8, 6, 4]
        for record in per_share.values():
            decode = record["decode"]["40"]
            assert decode["op_per_token_s"] > 0 and decode["layer_per_token_s"] > 0
            # The KV cache holds every head (other tokens may pick them): 2 · L · H · K float32.
            assert decode["cache_bytes"] == 2 * 40 * 8 * 8 * 4
    sparse, dense = report["ratios"]["sparse"], report["ratios"]["dense"]
    assert sparse["75"]["op_flops"] < 0.85 and sparse["50"]["op_flops"] < 0.65
    assert sparse["50"]["layer_flops"] < sparse["75"]["layer_flops"] < 1.0
    assert abs(dense["50"]["op_flops"] - 1.0) < 0.01  # zeros are not savings
    assert report["targets"]["sparse_op_flops_50_vs_100"]["pass"] is True
