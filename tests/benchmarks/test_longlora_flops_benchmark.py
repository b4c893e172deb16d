"""Smoke test of benchmarks/longlora_flops.py at a tiny size, T = 64, groups of 32, blocks of 8: the analytic counts
by hand, and (slow: four compiles) XLA's count of the gathered path, Kmax = 4 of the 8 key blocks per query block,
about half the dense path's."""

import json

import pytest
from flax import nnx

from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from tests.helpers.benchmarks import load_benchmark

TINY = ["--seq-len", "64", "--group-size", "32", "--block", "8", "--batch", "1"]


def test_analytic_counts_by_hand():
    bench = load_benchmark("longlora_flops")
    cfg = SparseAttentionConfig(pattern="longlora", group_size=32, block_size=8, n_heads=4)
    layer = nnx.eval_shape(lambda: SparseAttention(128, cfg, rngs=nnx.Rngs(0)))  # the lists need no weights
    a = bench.analytic(layer.block_mask(8, 8), 64, 8)
    # Unshifted lists: 2 groups of 4 blocks, 10 causal block pairs each; shifted: half-group, group, half-group,
    # 3 + 10 + 3. Tokens: 2 x 32·33/2 = 1056 unshifted, 16·17/2 + 32·33/2 + 16·17/2 = 800 shifted.
    assert a["block_pairs_per_list"] == [20, 20, 16, 16]
    assert (a["listed_block_pairs"], a["dense_causal_block_pairs"]) == (18, 36)
    assert (a["visible_token_pairs"], a["dense_causal_token_pairs"]) == (928, 64 * 65 / 2)


@pytest.mark.slow
def test_main_xla_counts(tmp_path):
    bench = load_benchmark("longlora_flops")
    out = tmp_path / "flops.json"
    report = bench.main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["analytic"]["listed_block_pairs"] == 18 and report["setup"]["Kmax"] == 4
    for ratio in report["xla_cost_analysis_flops"]["ratio"].values():
        assert 0.4 < ratio < 0.65, report["xla_cost_analysis_flops"]
