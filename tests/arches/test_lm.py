"""The decoder LM over every registered mixer: decoding equals the parallel pass, causality, state sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.arches.registry import MIXERS
from effarch.layers.attention import AttentionConfig
from effarch.layers.based import BasedConfig
from effarch.layers.diffqkv import DiffQKVConfig
from effarch.layers.landmark import LandmarkConfig
from effarch.layers.lightning import LightningConfig
from effarch.layers.mlp import MLPConfig
from effarch.layers.sliding_window import SlidingWindowConfig
from effarch.layers.titans import NeuralMemoryConfig
from effarch.layers.titans_attention import TitansAttentionConfig
from tests.helpers.numerics import assert_close

V, D, T = 37, 24, 19


def make(mixers, **kw) -> DecoderLM:
    cfg = ModelConfig(
        vocab_size=V, d_model=D, n_layers=len(mixers), mixers=tuple(mixers),
        attention=AttentionConfig(n_heads=3, n_kv_heads=1),
        based=BasedConfig(feature_dim=5, n_heads=2, chunk_size=8),
        sliding_window=SlidingWindowConfig(n_heads=2, window=6),
        lightning=LightningConfig(n_heads=3, block_size=8),
        # chunks of 4 and refreshes every 8 tokens: prompts of 1 and 7 tokens end inside both; the clamped update
        # (max_grad_norm) in the layer's prefill and decode paths alike
        titans=NeuralMemoryConfig(n_heads=2, chunk_size=4, batch_size=8, n_persistent=2, max_grad_norm=0.05),
        # MAC segments of 8 (T = 19: two whole segments and a partial one); MAG / MAL windows of 6
        titans_attention=TitansAttentionConfig(n_heads=2, window=6, segment_len=8),
        diffqkv=DiffQKVConfig(n_q_heads=6, n_k_heads=1, n_v_heads=3, k_cache_dim=2, aug_q_hidden=10),
        landmark=LandmarkConfig(n_heads=2, block_len=4, tile=8),
        **kw,
    )
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def tokens(seed=0, b=2, t=T):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


ALL = sorted(MIXERS)


@pytest.mark.parametrize("mixer", ALL)
@pytest.mark.parametrize("prompt_len", [1, 7])
def test_prefill_then_decode_equals_forward(mixer, prompt_len):
    model = make([mixer, "attention"] if mixer != "attention" else [mixer])
    x = tokens()
    full = model(x)
    state, logits = model.prefill(model.init_state(2, T), x[:, :prompt_len])
    outs = [logits]
    step = jax.jit(lambda s, t: model.decode_step(s, t))
    for t in range(prompt_len, T):
        state, lt = step(state, x[:, t])
        outs.append(lt[:, None])
    assert_close(f"{mixer} decode", jnp.concatenate(outs, 1), full, rtol=1e-5)


@pytest.mark.parametrize("mixer", ALL)
def test_causal(mixer):
    model = make([mixer, mixer], mlp=MLPConfig("swiglu"))
    x = tokens()
    y = x.at[:, 11].set((x[:, 11] + 1) % V)
    a, b = model(x), model(y)
    np.testing.assert_array_equal(np.asarray(a[:, :11]), np.asarray(b[:, :11]))
    assert not np.allclose(np.asarray(a[:, 11:]), np.asarray(b[:, 11:]))


def test_hybrid_layout_repeats_the_mixer_list():
    cfg = ModelConfig(n_layers=7, mixers=("base_conv", "based", "sliding_window", "base_conv", "base_conv"))
    assert cfg.layer_mixers() == ("base_conv", "based", "sliding_window", "base_conv", "base_conv", "base_conv",
                                  "based")


def test_state_size_grows_for_attention_only():
    attn = make(["attention"])
    assert attn.state_size(200) == 2 * attn.state_size(100) > 0  # KV cache: linear in T
    for mixer in ("based", "lightning", "base_conv", "zoology_base_conv", "titans_lmm", "titans_mac", "titans_mag",
                  "titans_mal"):
        m = make([mixer])
        assert m.state_size(100) == m.state_size(10_000) > 0, mixer
    swa = make(["sliding_window"])
    assert swa.state_size(6) == swa.state_size(10_000)  # ring buffer of `window` entries


def test_srms_norm_and_sglu_block():
    model = make(["lightning"], norm="srms", mlp=MLPConfig("sglu"))
    params = nnx.state(model, nnx.Param)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert not any("norm" in n for n in names), names  # SRMSNorm has no weight
    assert any("u_proj" in n for n in names)
    x = tokens()
    grads = jax.grad(lambda m: jnp.mean(m(x)))(model)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_remat_gives_same_gradients():
    a, b = make(["attention", "base_conv"]), make(["attention", "base_conv"], remat=True)
    x = tokens()
    ga = jax.grad(lambda m: jnp.mean(m(x) ** 2))(a)
    gb = jax.grad(lambda m: jnp.mean(m(x) ** 2))(b)
    for u, w in zip(jax.tree.leaves(nnx.state(ga, nnx.Param)), jax.tree.leaves(nnx.state(gb, nnx.Param))):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-5, atol=1e-7)
