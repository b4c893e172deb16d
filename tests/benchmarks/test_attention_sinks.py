"""benchmarks/attention_sinks.py on a random-init sink_window run with BOS: `--sink-positions true` reproduces
`effarch eval RUN perplexity --lengths`, `cache` changes nothing up to n_sink + window tokens and re-scores the sink
past them, and the attention readout is the layers' own (their outputs recomputed from the probabilities)."""

import jax
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.sparse_attention import SparseAttentionConfig
from effarch.train.config import Config, DataConfig, TextData, TrainConfig
from effarch.train.convert import write_run
from effarch.train.evals import perplexity
from tests.helpers.benchmarks import load_benchmark

DOCS = {"a.txt": "alpha document\n" * 20, "b.txt": "béta: ünïcode ✓\n" * 9, "c.txt": "gamma " * 60,
        "d.txt": "delta\n", "e.txt": "epsilon " * 23}


# Builds a corpus, writes a run and compiles six dense forward passes (~15 s on 2 idle cores): the slow suite.
@pytest.mark.slow
def test_sink_positions_and_mass(tmp_path):
    for name, text in DOCS.items():
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / name).write_text(text)
    sparse = SparseAttentionConfig(pattern="sink_window", n_sink=1, window=8, block_size=4, n_heads=2)
    cfg = Config(model=ModelConfig(vocab_size=258, d_model=16, n_layers=2, mixers=("sparse_attention",),
                                   sparse_attention=sparse),
                 data=DataConfig(task="text", seq_len=16, data_dir=str(tmp_path / "tfds"),
                                 text=TextData(source=str(tmp_path / "corpus"), val_fraction=0.2, bos=True)),
                 train=TrainConfig(batch_size=1, eval_batch_size=4))
    model = DecoderLM(cfg.model, rngs=nnx.Rngs(0))
    run = write_run(cfg, nnx.state(model, nnx.Param), tmp_path / "run")
    bench = load_benchmark("attention_sinks")
    report = bench.main(["--run-dir", str(run), "--lengths", "9", "32", "--sink-positions", "true", "cache",
                         "--mass", "32", "--query-from", "16", "--mass-windows", "3"])
    held = perplexity.heldout_text(cfg)
    ref = perplexity.evaluate_lengths(model, held, [9, 32], rows={9: 7, 32: 2}, bucket=16)["results"]
    bits = report["bits"]
    for L in ("9", "32"):
        assert bits["true"][L]["tokens"] == ref[f"T{L}"]["tokens"] == bits["cache"][L]["tokens"]
        assert bits["true"][L]["loss"] == pytest.approx(ref[f"T{L}"]["loss"], rel=1e-5)  # effarch eval's numbers
    # Up to n_sink + window = 9 tokens no sink key is outside the window: the same; past it the sink is re-scored.
    assert bits["cache"]["9"]["loss"] == pytest.approx(bits["true"]["9"]["loss"], rel=1e-6)
    assert abs(bits["cache"]["32"]["loss"] - bits["true"]["32"]["loss"]) > 1e-6
    layers = report["mass"]["layers"]
    assert len(layers) == 2 and report["mass"]["windows"] == 3
    for r in layers:
        assert r["rel_err"] < 1e-4  # o_proj(P v) is the layer's own output
        assert r["uniform"] == pytest.approx(1 / 9, abs=1e-5)  # the sink and the 8 window keys
        k0, k3, last = (np.array(r[k]) for k in ("key0", "keys0_3", "last64"))
        assert (k0 > 0).all() and (k0 == k3).all()  # keys 1-3 are outside the window of queries 16-31
        np.testing.assert_allclose(last, 1.0, atol=1e-5)  # at L = 32 every visible key is among the newest 64
    jax.clear_caches()
