"""Smoke test of benchmarks/kv_policy_evidence.py at a tiny size: an untrained 1-layer passkey model (the runs are
restored through a stub), one length, one policy, one budget: the cells' keys and fields, the KV bytes the full cache
and the window read, --resume skipping the cells done, and the PNG. Never the accuracies (the policies' and the evals'
own tests check those). Slow: a prefill and decode compile per cell."""

import json
import types

import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from tests.helpers.benchmarks import load_benchmark


@pytest.mark.slow
def test_cells_at_a_tiny_size(tmp_path, monkeypatch):
    bench = load_benchmark("kv_policy_evidence")
    model = DecoderLM(ModelConfig(vocab_size=19, d_model=8, n_layers=1, mixers=("attention",)), rngs=nnx.Rngs(0))
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(seq_len=32), train=types.SimpleNamespace(run_dir="stub"))
    restored = []
    monkeypatch.setattr(bench, "restore_run", lambda run: restored.append(run) or (cfg, model, 0))
    out = tmp_path / "e.json"
    argv = ["--passkey", "stub", "--tasks", "passkey", "--lengths", "64", "--budgets", "16", "--policies", "window",
            "razor", "--depths", "0.5", "--trials", "2", "--out", str(out)]
    report = bench.main(argv)
    cells = report["cells"]
    assert set(cells) == {"passkey|64|full|None", "passkey|64|window|16"}
    assert report["skipped"] == {"passkey|razor": "needs a heads file (--razor-heads)"}
    per_token = 2 * 8 * 4  # K and V of d_model 8, float32, one layer
    assert cells["passkey|64|full|None"]["kv_bytes_per_token"] == 64 * per_token
    # The question ([Q] [PK]) and 4 answer digits are decoded, each after >= 57 > 16 tokens: 16 read per step.
    assert cells["passkey|64|window|16"]["kv_tokens_per_step"] == 16
    assert cells["passkey|64|window|16"]["kv_bytes_per_token"] == 16 * per_token
    assert 0 <= cells["passkey|64|window|16"]["accuracy"] <= 1
    assert out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.read_text())["cells"] == cells
    bench.main([*argv, "--resume"])  # every cell done: nothing is evaluated again
    assert json.loads(out.read_text())["cells"] == cells
