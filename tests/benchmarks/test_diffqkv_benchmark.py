"""Smoke test of benchmarks/diffqkv.py at tiny sizes: the JSON report, the exact cache accounting (the paper's
37.5%), and decode records whose cache bytes are the layers' real arrays. Timings are only checked to exist."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark


@pytest.mark.slow  # a benchmark smoke test of several seconds: the slow suite (the default suite's 10-minute budget)
def test_main_writes_report_with_exact_cache_bytes(tmp_path, capsys):
    bench = load_benchmark("diffqkv")
    out = tmp_path / "report.json"
    # One context and three of the four paths: each (path, context) is a compilation, the cost of this test.
    argv = ["--contexts", "40", "--d-model", "32", "--n-q-heads", "4", "--n-v-heads", "4", "--head-dim", "8",
            "--paths", "gqa", "diffqkv", "diffqkv_selv", "--reps", "1", "--warmup", "1", "--out", str(out)]
    report = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert set(report) == {"config", "cache_bytes_bf16", "decode", "decode_time_ratio_vs_gqa", "load"}

    cache = report["cache_bytes_bf16"]
    # bf16, d_h = 64: GQA 2 * 16 heads * 64 * 2 bytes; Sigma (4 + 16) heads; with K cached at dim 32, 4 * 32 + 16 * 64.
    assert cache["gqa_32q_16kv"]["bytes_per_token"] == 4096
    assert cache["diffqkv_32q_4k_16v"]["bytes_per_token"] == 2560
    assert cache["diffqkv_32q_4k_16v_kdim32"]["bytes_per_token"] == 2304
    assert cache["diffqkv_32q_4k_16v"]["reduction_vs_gqa"] == pytest.approx(0.375)
    assert cache["diffqkv_32q_4k_16v_kdim32"]["reduction_vs_gqa"] == pytest.approx(0.4375)
    for record in cache.values():
        assert record["init_state_bytes_per_token"] == record["bytes_per_token"]
        assert record["bytes_at_context"] == {"40": 40 * record["bytes_per_token"]}

    decode = report["decode"]
    assert set(decode) == {"gqa", "diffqkv", "diffqkv_selv"}
    for path, per_context in decode.items():
        assert set(per_context) == {"40"}
        for context, record in per_context.items():
            assert record["median_s"] > 0 and len(record["times_s"]) == 1
            # The decode cache really holds the layer's state_size bytes (float32, context + 1 slots).
            assert record["cache_bytes"] == record["state_size"]
            per_token = 2 * 4 * 8 * 4 if path == "gqa" else (1 * 8 + 4 * 8) * 4
            assert record["cache_bytes"] == (int(context) + 1) * per_token
    assert report["decode_time_ratio_vs_gqa"]["gqa"] == {"40": 1.0}
    assert report["decode_time_ratio_vs_gqa"]["diffqkv"]["40"] > 0
