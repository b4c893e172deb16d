"""benchmarks/decode_cpu.py: every mixer's LM builds from its configs/lm file, one (mixer, batch) measured at tiny
sizes through generate's program, and (slow) the CLI. Timings themselves are not checked (2 shared CPU cores)."""

import json

import pytest

from effarch.arches.registry import MIXERS
from tests.helpers.benchmarks import load_benchmark


def test_every_decoding_mixer_has_a_model():
    bench = load_benchmark("decode_cpu")
    registered = {mixer for _, mixer in bench.MIXERS.values()}
    # Every registered mixer but the convolutions (a decode path, but no attention to compare) is benchmarked.
    assert registered == set(MIXERS) - {"base_conv", "zoology_base_conv"}
    for name, (_, mixer) in bench.MIXERS.items():
        cfg = bench.model_config(name, 4)
        assert cfg.model.layer_mixers() == (mixer,) * 4 and cfg.model.d_model == 128
    assert bench.model_config("sparse_sink_window", 1).model.sparse_attention.pattern == "sink_window"


def test_measure_attention():
    bench = load_benchmark("decode_cpu")
    cfg, model = bench.build("attention", 1)
    r = bench.measure(model, 2, 8, 4, vocab=cfg.model.vocab_size, reps=1)
    assert len(r["times_s"]) == len(r["prefill_times_s"]) == 1
    assert r["end_to_end_tokens_per_s"] == pytest.approx(2 * 4 / r["median_s"])
    if r["decode_tokens_per_s"] is not None:  # None when noise made P + 1 slower than P + N
        assert r["decode_tokens_per_s"] == pytest.approx(2 * 3 / (r["median_s"] - r["prefill_median_s"]))


@pytest.mark.slow
def test_cli_report(tmp_path):
    bench = load_benchmark("decode_cpu")
    out = tmp_path / "decode.json"
    report = bench.main(["--mixers", "attention", "lightning", "--batches", "1", "--prompt", "8", "--new-tokens", "4",
                         "--n-layers", "1", "--reps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"attention", "lightning"} and "load" in report
    assert report["results"]["attention"]["1"]["vs_attention"] in (1.0, None)
    with pytest.raises(SystemExit) as e:
        bench.main(["--mixers", "nope"])
    assert e.value.code == 2
