"""The attention patterns of CAB (the Comprehensive Attention Benchmark, arXiv 2210.07661 §3) each registered mixer
supports, as docs/layers.md's table states them, checked against the code: a new mixer must be added to PATTERNS,
and a claimed pattern must build and run (a denied one must have no way to be configured)."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import ModelConfig
from effarch.arches.registry import CONFIGS, MIXERS, build_mixer
from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.sparse_attention import NONCAUSAL_PATTERNS, SparseAttentionConfig

D, T = 24, 12
# mixer -> (non-causal self, causal self, non-causal cross, causal cross): docs/layers.md's table.
ATTENTION = (True, True, True, False)  # causal: false; the default; context_dim=; cross needs causal=False
SPARSE = (True, True, False, False)  # NONCAUSAL_PATTERNS (biformer, bidir_window); every other pattern
CAUSAL_SELF_ONLY = (False, True, False, False)
PATTERNS = {"attention": ATTENTION, "sparse_attention": SPARSE} | {
    name: CAUSAL_SELF_ONLY for name in ("base_conv", "zoology_base_conv", "based", "sliding_window", "titans_lmm",
                                        "lightning", "diffqkv", "moh", "landmark", "titans_mac", "titans_mag",
                                        "titans_mal")}


def small_config(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": D, "n_layers": 2, **{key: e.small for key, e in CONFIGS.items()}, **kw})


def test_every_registered_mixer_is_in_the_table():
    assert set(PATTERNS) == set(MIXERS)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_causal_self_and_no_hidden_switches(name):
    """Every mixer is causal self attention at its registered config; a mixer denied the non-causal or cross
    patterns has no config field that could turn them on and no context argument."""
    mixer = build_mixer(name, small_config(), 0, nnx.Rngs(0))
    assert getattr(mixer, "causal", True)
    noncausal_self, _, noncausal_cross, _ = PATTERNS[name]
    fields = {f.name for key in MIXERS[name].configs for f in dataclasses.fields(CONFIGS[key].cls)}
    if not noncausal_self:
        assert "causal" not in fields and "pattern" not in fields
    if not noncausal_cross:
        assert "context" not in inspect.signature(type(mixer).__call__).parameters


def _reads_ahead(layer, x) -> bool:
    """Whether token 0's output changes when the last token does."""
    y0 = layer(x)
    y1 = layer(x.at[:, -1].add(1.0))
    return not np.allclose(y0[:, 0], y1[:, 0])


def test_noncausal_self():
    x = jax.random.normal(jax.random.key(0), (1, T, D))
    attention = Attention(D, AttentionConfig(n_heads=2, causal=False), rngs=nnx.Rngs(0))
    assert not attention.causal and _reads_ahead(attention, x)
    assert set(NONCAUSAL_PATTERNS) == {"biformer", "bidir_window"}
    cfg = small_config(sparse_attention=SparseAttentionConfig(pattern="bidir_window", block_size=4, top_k=3,
                                                              n_heads=2))
    sparse = build_mixer("sparse_attention", cfg, 0, nnx.Rngs(0))
    assert not sparse.causal and _reads_ahead(sparse, x)


def test_cross_attention_is_noncausal_only():
    x, context = jnp.ones((1, T, D)), jax.random.normal(jax.random.key(1), (1, 7, 10))
    cross = Attention(D, AttentionConfig(n_heads=2, causal=False), context_dim=10, rngs=nnx.Rngs(0))
    assert cross(x, context).shape == (1, T, D) and not cross.causal
    with pytest.raises(ValueError, match="needs causal=False"):
        Attention(D, AttentionConfig(n_heads=2), context_dim=10, rngs=nnx.Rngs(0))
