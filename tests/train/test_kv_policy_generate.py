"""`effarch generate --kv-policy`: greedy generation through a full-budget policy equals full-cache generation, a
small budget is a different decoder, and bad policies are one line, exit 2."""

import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.kv_policies import make_policy
from effarch.train.generate import generate
from tests.helpers.cli import cli


@pytest.mark.parametrize("name", ["quest", pytest.param("window", marks=pytest.mark.slow),
                                  pytest.param("retrieval", marks=pytest.mark.slow)])
def test_full_budget_generation_is_full_cache_generation(name):
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, attention=AttentionConfig(n_heads=4, n_kv_heads=2))
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    prompt = np.random.default_rng(0).integers(0, 64, (2, 9))
    want = generate(model, prompt, 12)
    model.set_kv_policy(make_policy(name, ["budget=32"]))  # 9 + 12 tokens: all of them
    np.testing.assert_array_equal(generate(model, prompt, 12), want)


def test_generate_cli_bad_policy_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "generate", str(tmp_path), "--prompt", "1 2", "--kv-policy", "quest", "budget=x")
    assert code == 2 and "--kv-policy: kv policy quest: budget must be an integer, got 'x'" in err
    assert err.count("\n") == 1
    code, _, err = cli(capsys, "generate", str(tmp_path), "--prompt", "1 2", "--kv-policy", "duo", "threshold=2")
    assert code == 2 and "--kv-policy: kv policy duo: threshold must be in [0, 1] (gates are), got 2.0" in err
    assert err.count("\n") == 1
