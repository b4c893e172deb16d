"""benchmarks/sparsity_sweep.py: its density counts against token masks built pair by pair, and (slow) the sweep end to
end on a tiny passkey model and its distilled seer gates."""

import json
import math

import numpy as np
import pytest

from tests.helpers.benchmarks import load_benchmark

sweep = load_benchmark("sparsity_sweep")


def _mask_density(mask: np.ndarray) -> float:
    T = mask.shape[0]
    assert not np.triu(mask, 1).any()  # causal
    return mask.sum() / (T * (T + 1) / 2)


@pytest.mark.parametrize("T,block,k", [(64, 16, 1), (64, 16, 2), (64, 16, 4), (96, 8, 3), (64, 8, 20)])
def test_topk_density_counts_the_blocks_of_each_query_block(T, block, k):
    t = np.arange(T)
    qb, kb = t[:, None] // block, t[None, :] // block
    # query block I reads blocks I - k + 1 .. I (which blocks does not matter for the count: each is whole or diagonal)
    mask = (kb <= qb) & (kb > qb - k) & (t[None, :] <= t[:, None])
    assert math.isclose(sweep.topk_density(T, block, k), _mask_density(mask))


@pytest.mark.parametrize("T,span", [(64, 1), (64, 20), (64, 64), (50, 200)])
def test_span_density_is_sinks_plus_window(T, span):
    t = np.arange(T)
    n_sink = min(4, span - 1)
    window = span - n_sink
    mask = ((t[None, :] < n_sink) | (t[None, :] > t[:, None] - window)) & (t[None, :] <= t[:, None])
    assert math.isclose(sweep.span_density(T, span), _mask_density(mask))


def test_hyper_density_is_exact_below_the_minimum_length_and_sparser_above():
    assert sweep.hyper_density(64, 16, 8, 64) == 1.0
    # one level: two exact causal halves of 32 plus the cross quarter, each query reading its block + samples
    assert math.isclose(sweep.hyper_density(64, 8, 4, 32), (2 * 32 * 33 / 2 + 32 * 12) / (64 * 65 / 2))
    assert sweep.hyper_density(512, 16, 16, 32) < sweep.hyper_density(512, 64, 16, 32) < 1


def test_window_for_matches_the_target_density():
    w = sweep.window_for(256, 16, 0.3)
    assert abs(sweep.span_density(256, 16 + w) - 0.3) <= sweep.span_density(256, 17 + w) - sweep.span_density(
        256, 16 + w)


# Trains a tiny passkey model and its seer gates, then converts and evaluates every pattern (~1-2 min): slow suite.
@pytest.mark.slow
def test_sweep_on_a_tiny_passkey_model(tmp_path):
    from effarch.train.config import load_config
    from effarch.train.train import train_and_evaluate
    from tests.helpers.benchmarks import BENCHMARKS

    configs = BENCHMARKS.parent / "configs"
    common = ["data.seq_len=64", "data.passkey.examples=64", "train.async_checkpoint=false"]
    base, seer = tmp_path / "dense", tmp_path / "seer"
    train_and_evaluate(load_config([configs / "passkey" / "attention_moa.yaml", configs / "overlays" / "tiny.yaml"],
                                   [f"train.run_dir={base}", *common]))
    train_and_evaluate(load_config([configs / "passkey" / "attention_moa.yaml", configs / "passkey" /
                                    "seer_distill.yaml", configs / "overlays" / "tiny.yaml"],
                                   [f"train.run_dir={seer}", f"train.init_from={base}", *common]))
    out = tmp_path / "sweep"
    result = sweep.main(["--base", str(base), "--seer", str(seer), "--out", str(out), "--levels", "2", "--block", "8",
                         "--routing-blocks", "8", "--routing-batches", "2", "--hyper-blocks", "8",
                         "--hyper-min-len", "16", "--moa-batches", "1", "--trials", "2",
                         "--patterns", "dense", "sink_window", "moa", "mean_topk", "seer", "routing", "hyper"])
    assert json.loads((out / "sparsity_sweep.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "sparsity_sweep.png").stat().st_size > 0
    by = {r["pattern"]: r for r in result["points"]}
    assert set(by) == {"dense", "sink_window", "moa", "mean_topk", "seer", "routing", "hyper"}
    assert by["dense"]["density"] == 1.0
    assert by["mean_topk"]["density"] == by["seer"]["density"] == sweep.topk_density(64, 8, 2)
    assert {"decode", "parallel"} <= set(by["seer"])
    assert all(0 <= r["quality"] <= 1 and 0 < r["density"] <= 1 for r in result["points"])
