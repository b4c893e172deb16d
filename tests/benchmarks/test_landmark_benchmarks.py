"""Smoke tests of the landmark benchmarks at tiny sizes: reports have the documented keys and consistent values."""

import json

import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.landmark import LandmarkConfig
from effarch.train.data import passkey
from tests.helpers.benchmarks import load_benchmark


# Heavy end-to-end (a minute or more on 2 cores): the slow suite (`-m slow`), so the default stays under 10 min.
@pytest.mark.slow
def test_memory_cost_report(tmp_path):
    bench = load_benchmark("landmark_memory_cost")
    out = tmp_path / "cost.json"
    report = bench.main(["--contexts", "60", "120", "--d-model", "16", "--heads", "2", "--block-len", "4",
                         "--tokens", "2", "--reps", "1", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"config", "results", "ratios", "targets", "load"}
    mem, exact = report["results"]["memory"], report["results"]["exact"]
    assert set(mem) == set(exact) == {"60", "120"}
    # Blocks of 5: 12 and 24 cached blocks; the attention part is bounded, landmark scoring and the KV cache grow.
    assert mem["60"]["n_blocks"] == 12 and mem["120"]["n_blocks"] == 24
    assert mem["60"]["attention_bytes_per_token"] == mem["120"]["attention_bytes_per_token"] == 3 * 5 * 2 * 2 * 8 * 4
    assert mem["120"]["landmark_scoring_bytes_per_token"] == 2 * mem["60"]["landmark_scoring_bytes_per_token"]
    assert exact["120"]["kv_bytes_per_token"] == 2 * exact["60"]["kv_bytes_per_token"]
    assert all(r["median_s_per_token"] > 0 for r in (*mem.values(), *exact.values()))
    assert report["ratios"]["memory"]["60"] == 1.0


@pytest.mark.slow  # a benchmark smoke test of several seconds: the slow suite (the default suite's 10-minute budget)
def test_passkey_report_retrieval_of_everything_matches_full(tmp_path):
    bench = load_benchmark("passkey_landmark")
    # Untrained model; k = 8 covers every block and remap is off, so "topk8" must score exactly like "full".
    cfg = ModelConfig(vocab_size=passkey.VOCAB_SIZE, d_model=16, n_layers=1, mixers=("landmark",),
                      landmark=LandmarkConfig(n_heads=2, block_len=7, tile=16, remap=False))
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    out = tmp_path / "passkey.json"
    report = bench.main(["--lengths", "32", "48", "--depths", "0", "1", "--trials", "2", "--topk", "8",
                         "--chunk", "16", "--out", str(out)], model=model)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"full", "topk8"}
    for T in ("32", "48"):
        full, topk = report["results"]["full"][T], report["results"]["topk8"][T]
        assert full == topk
        assert set(full["by_depth"]) == {"0.0", "1.0"}
        assert 0.0 <= full["accuracy"] <= 1.0


def test_passkey_accuracy_counts_exact_matches():
    bench = load_benchmark("passkey_landmark")
    labels = np.array([[-100, 3, 4], [-100, 3, 4]])
    logits = np.zeros((2, 3, 5))
    logits[0, 1, 3] = logits[0, 2, 4] = 1.0  # row 0 right on both digits
    logits[1, 1, 3] = logits[1, 2, 0] = 1.0  # row 1 wrong on the second
    assert bench.accuracy(logits, labels) == 0.5


def test_passkey_heatmap_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    bench = load_benchmark("passkey_landmark")
    report = {"config": {"lengths": [32, 64], "depths": [0.0, 1.0]},
              "results": {"full": {t: {"by_depth": {"0.0": 1.0, "1.0": 0.5}} for t in ("32", "64")}}}
    bench.heatmap(report, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
