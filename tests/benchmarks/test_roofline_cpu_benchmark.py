"""benchmarks/roofline_cpu.py: the useful-FLOP formulas against hand counts, one timed case end to end at a tiny T,
the efficiency length's rule, and (slow) the whole CLI. Timings themselves are not checked (2 shared CPU cores)."""

import json

import jax
import pytest

from tests.helpers.benchmarks import load_benchmark


def test_useful_flops_by_formula():
    bench = load_benchmark("roofline_cpu")
    key = jax.random.key(0)
    # Causal softmax, H 4, K = V = 32: 2 (K + V) H T(T+1)/2; batch rows add up.
    assert bench.OPS["softmax_xla"](2, 8, key).fwd_flops == 2 * 2 * 64 * 4 * 36
    # Sliding window 64 at T = 100: the first 64 queries see 1..64 keys, the other 36 see 64.
    assert bench.OPS["sliding_window"](1, 100, key).fwd_flops == 2 * 128 * 2 * (64 * 65 // 2 + 36 * 64)
    # BASED at T = 128: 2 chunks of 64, P = 153: H N [(F + V) C(C+1) + 4 C P V].
    assert bench.OPS["based"](1, 128, key).fwd_flops == 2 * 2 * (80 * 64 * 65 + 4 * 64 * 153 * 64)
    assert bench.OPS["lightning"](1, 128, key).fwd_flops == 4 * 2 * (64 * 64 * 65 + 4 * 64 * 32 * 32)
    # Titans: 14 D F per token and head, whatever the chunk.
    assert bench.OPS["titans_c16"](1, 64, key).fwd_flops == bench.OPS["titans_c64"](1, 64, key).fwd_flops \
        == 14 * 64 * 128 * 2 * 64
    # MoH: 3 active heads of 4, plus the output projection to d_model 128.
    assert bench.OPS["moh"](1, 8, key).fwd_flops == 2 * 64 * 3 * 36 + 2 * 3 * 32 * 128 * 8
    # Block-sparse at density 1: every causal block listed, the same count as dense causal attention.
    assert bench.OPS["block_sparse"](1, 128, key, density=1.0).fwd_flops == 2 * 64 * 4 * (128 * 129 // 2)


def test_one_case_fwd_bwd():
    bench = load_benchmark("roofline_cpu")
    case = bench.OPS["based"](1, 64, jax.random.key(0))
    r = bench.measure_case(case, "fwd_bwd", reps=2, case_seconds=0.1, max_temp_bytes=2**30)
    assert r["useful_flops"] == 3 * case.fwd_flops and len(r["times_s"]) == 2
    assert r["gflops"] == pytest.approx(r["useful_flops"] / r["median_s"] / 1e9)
    capped = bench.measure_case(case, "fwd", reps=2, case_seconds=0.1, max_temp_bytes=-1)
    assert "not run" in capped["skipped"] and "median_s" not in capped


def test_targets_from_the_fractions():
    bench = load_benchmark("roofline_cpu")
    results = {"based": {"4096": {"fwd_bwd": {"fraction_of_matmul": 0.6}}},
               "titans_c16": {"4096": {"fwd_bwd": {"fraction_of_matmul": 0.2}}}, "titans_c64": {"1024": {}}}
    assert bench.targets(results) == {
        "based_fwd_bwd_4096_fraction_of_matmul": {"fraction": 0.6, "min": 0.5, "pass": True},
        "titans_c16_fwd_bwd_4096_fraction_of_matmul": {"fraction": 0.2, "min": 0.5, "pass": False}}


def test_efficiency_length_is_where_it_stays_faster():
    bench = load_benchmark("roofline_cpu")

    def rec(*medians):
        return {str(t): {"fwd_bwd": {"median_s": m} if m else {"skipped": "cap"}}
                for t, m in zip((1, 2, 4, 8), medians)}

    results = {"softmax_xla": rec(1.0, 2.0, 4.0, None), "fast_late": rec(2.0, 1.0, 3.0, 1.0),
               "flip": rec(0.5, 3.0, 1.0, 1.0), "never": rec(2.0, 3.0, 5.0, 1.0)}
    # softmax_xla did not run at 8: the comparison stops at 4.
    assert bench.efficiency_lengths(results, (1, 2, 4, 8)) == {"fast_late": 2, "flip": 4, "never": None}


@pytest.mark.slow
def test_cli_report(tmp_path):
    bench = load_benchmark("roofline_cpu")
    out = tmp_path / "sweep.json"
    report = bench.main(["--sweep", "--ops", "softmax_xla", "lightning", "--lengths", "64", "128", "--reps", "2",
                         "--case-seconds", "0.1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "sweep.png").exists() and set(report["efficiency_length_vs_softmax_xla"]) == {"lightning"}
    assert report["config"]["modes"] == ["fwd_bwd"] and "load" in report
    assert report["machine"]["matmul_2048"]["gflops_best"] > 0
    with pytest.raises(SystemExit) as e:
        bench.main(["--ops", "nope"])
    assert e.value.code == 2
