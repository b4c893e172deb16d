"""Smoke tests of benchmarks/scaling.py and benchmarks/mqar_recall_vs_state.py: each sweep runs end to end at tiny
sizes and its JSON report has the documented keys. Timings and accuracies are not checked (2 shared CPU cores)."""

import json

import pytest

from tests.helpers.benchmarks import load_benchmark


@pytest.mark.slow  # three paths at two lengths, trained and decoded: ~11 s; the report's code paths are shared with
# benchmarks/_common.py's sweep, which the other benchmarks' smoke runs cover by default
def test_scaling_main_writes_report_with_expected_keys(tmp_path, capsys):
    bench = load_benchmark("scaling")
    out = tmp_path / "scaling.json"
    argv = ["--lengths", "48", "96", "--decode-lengths", "16", "40", "--heads", "3", "--feature-dim", "5",
            "--value-dim", "6", "--chunk-size", "16", "--reps", "1", "--warmup", "1", "--decode-steps", "2",
            "--out", str(out)]
    report = bench.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert set(report) == {"config", "train", "skipped", "decode", "targets", "load"}
    assert report["config"]["lengths"] == [48, 96] and report["config"]["decode_lengths"] == [16, 40]
    assert set(report["train"]) == {"based_xla", "based_reference", "softmax_xla"}
    for path, per_t in report["train"].items():
        assert set(per_t) == {"48", "96"}
        for t, record in per_t.items():
            assert {"per_token_s", "median_s", "times_s", "memory", "compile_s"} <= set(record)
            assert record["per_token_s"] > 0 and len(record["times_s"]) == 1
            memory = record["memory"]
            assert set(memory) == {"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "peak_bytes"}
            # q, k (F = 5 for BASED, V = 6 for softmax), v and the cotangent (V = 6), float32 [1, T, 3, *].
            qk_dim = 6 if path == "softmax_xla" else 5
            assert memory["argument_bytes"] == 4 * int(t) * 3 * (2 * qk_dim + 2 * 6)
        assert report["skipped"][path] == {}
    assert set(report["decode"]) == {"based", "softmax"}
    for path, per_l in report["decode"].items():
        assert set(per_l) == {"16", "40"}
        for record in per_l.values():
            assert {"per_token_s", "times_s", "first_call_s", "state_bytes", "allocated_state_bytes"} <= set(record)
            assert len(record["times_s"]) == 2
    # BASED: H (1 + F + F(F+1)/2)(V + 1) floats whatever the context; softmax: 2 L H V floats of KV cache.
    assert {r["state_bytes"] for r in report["decode"]["based"].values()} == {3 * 21 * 7 * 4}
    assert report["decode"]["softmax"]["40"]["state_bytes"] == 2 * 40 * 3 * 6 * 4
    assert set(report["targets"]) == {
        "based_xla_per_token_time_flat",
        "based_xla_vs_reference_speedup",
        "based_decode_time_flat",
        "based_decode_state_bytes_flat",
    }
    # Each verdict is recomputed from the report's own measurements: a target that ignored them would fail here.
    targets, xla, ref = report["targets"], report["train"]["based_xla"], report["train"]["based_reference"]
    flat = targets["based_xla_per_token_time_flat"]
    ratio = xla["96"]["per_token_s"] / xla["48"]["per_token_s"]
    assert flat["ratio_longest_to_shortest"] == pytest.approx(ratio)
    assert flat["pass"] == (ratio <= bench.XLA_FLAT_MAX_RATIO)
    speed = targets["based_xla_vs_reference_speedup"]
    length = str(speed["length"])
    assert speed["speedup"] == pytest.approx(ref[length]["median_s"] / xla[length]["median_s"])
    assert speed["pass"] == (speed["speedup"] >= bench.XLA_MIN_SPEEDUP)
    decode_times = [r["per_token_s"] for r in report["decode"]["based"].values()]
    spread = max(decode_times) / min(decode_times) - 1
    assert targets["based_decode_time_flat"]["max_over_min_minus_1"] == pytest.approx(spread)
    assert targets["based_decode_time_flat"]["pass"] == (spread <= bench.DECODE_FLAT_TOLERANCE)
    assert targets["based_decode_state_bytes_flat"]["max_over_min_minus_1"] == 0
    assert targets["based_decode_state_bytes_flat"]["pass"] is True


@pytest.mark.slow  # a benchmark smoke test of several seconds: the slow suite (the default suite's 10-minute budget)
def test_scaling_quadratic_paths_over_memory_cap_are_skipped_not_run():
    bench = load_benchmark("scaling")
    report = bench.run([48], decode_lengths=[16], heads=3, feature_dim=5, value_dim=6, chunk_size=16, reps=1,
                       decode_steps=1, max_gib=1e-9)
    for path in ("based_reference", "softmax_xla"):
        record = report["train"][path]["48"]
        assert "per_token_s" not in record and record["memory"]["temp_bytes"] > 0
        assert "48" in report["skipped"][path]
    assert "per_token_s" in report["train"]["based_xla"]["48"]
    assert "based_xla_vs_reference_speedup" not in report["targets"]


# A training sweep in miniature (half a minute on 2 cores): the slow suite.
@pytest.mark.slow
def test_mqar_recall_vs_state_main_writes_report_with_expected_keys(tmp_path, capsys):
    bench = load_benchmark("mqar_recall_vs_state")
    out = tmp_path / "mqar.json"
    argv = ["--d-models", "16", "--seq-len", "32", "--kv-pairs", "2", "--train-examples", "64", "--test-examples",
            "16", "--max-steps", "2", "--batch-size", "8", "--eval-every", "1", "--lr", "based=1e-3", "--out",
            str(out), "model.vocab_size=64", "train.eval_batch_size=16"]
    report = bench.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert set(report) == {"benchmark", "config", "results", "load"}
    assert report["config"]["lrs"]["based"] == 1e-3
    rows = {row["mixer"]: row for row in report["results"]}
    assert set(rows) == {"based", "attention"}
    keys = {"mixer", "d_model", "mixers", "state_bytes", "num_params", "lr", "test_accuracy", "best_test_accuracy",
            "reached_target", "steps_to_target", "steps", "stopped_by", "wall_s", "eval_curve"}
    for row in rows.values():
        assert set(row) == keys
        assert row["d_model"] == 16 and 0 <= row["test_accuracy"] <= 1 and 1 <= row["steps"] <= 2
        assert row["mixers"][0] == "zoology_base_conv"
    # Conv buffer (k - 1 = 2 inputs of width 16) + BASED's state, 1 head, F = 16, head dim 16 / attention's KV cache.
    conv = 2 * 16 * 4
    # 153 = 1 + 16 + 16 * 17 / 2 symmetric Taylor features (273 before they were symmetric).
    assert rows["based"]["state_bytes"] == conv + 153 * 17 * 4
    assert rows["attention"]["state_bytes"] == conv + 2 * 32 * 16 * 4
