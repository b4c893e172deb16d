"""DiffQKV layer: GQA equivalence, K duplication, selective V, cache decoding == parallel, cache bytes, config."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.axes import Mixer
from effarch.layers.diffqkv import DiffQKVAttention, DiffQKVConfig
from tests.helpers.numerics import assert_close, rel_err

B, T, D = 2, 13, 15
# 6 query heads of dim 4, 1 K head, 3 V heads of dim 5; K cached at dim 2 and up-projected; AugQ width 9.
BASE = DiffQKVConfig(n_q_heads=6, n_k_heads=1, n_v_heads=3, head_dim=4, v_head_dim=5, k_cache_dim=2, aug_q_hidden=9)


def make_layer(seed=0, **overrides):
    return DiffQKVAttention(D, dataclasses.replace(BASE, **overrides), rngs=nnx.Rngs(seed))


def make_x(seed=1, T=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D), np.float32))


def decode_all(layer, x, prompt_len):
    """Prefill x[:, :prompt_len] (in two calls), then decode the rest one token at a time under jit."""
    state = layer.init_state(B, x.shape[1])
    half = prompt_len // 2
    state, y_a = layer.prefill(state, x[:, :half])
    state, y_b = layer.prefill(state, x[:, half:prompt_len])
    outs = [y_a, y_b]
    step = nnx.jit(lambda m, s, x_t: m.decode_step(s, x_t))
    for t in range(prompt_len, x.shape[1]):
        state, y_t = step(layer, state, x[:, t])
        outs.append(y_t[:, None])
    return state, jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "overrides",
    [{"k_cache_dim": None, "aug_q": False}],  # AugQ with a compressed K cache decodes in tests/conformance/
    ids=["plain_rotated_cache"],
)
def test_decode_matches_parallel(overrides):
    layer = make_layer(**overrides)
    assert isinstance(layer, Mixer)
    x = make_x()
    state, y = decode_all(layer, x, prompt_len=5)
    assert_close("decode", y, layer(x), 1e-5)
    assert int(state["pos"]) == T


def test_cache_stores_small_k_and_nv_values_and_state_size_counts_them():
    layer = make_layer()
    state = layer.init_state(B, 17)
    assert state["k"].shape == (B, 17, 1, 2) and state["v"].shape == (B, 17, 3, 5)
    cache_bytes = (state["k"].nbytes + state["v"].nbytes) // B
    assert layer.state_size(17) == cache_bytes == 17 * (1 * 2 + 3 * 5) * 4
    assert layer.state_size(17, cache_dtype=jnp.bfloat16) == cache_bytes // 2


def test_state_size_sigma_32_4_16_is_37_5_percent_below_gqa_16():
    # Sigma paper §2: (4 + 16) / (16 + 16) heads of cache, d_h = 64, at any length.
    sigma = DiffQKVAttention(2048, DiffQKVConfig(n_q_heads=32, n_k_heads=4, n_v_heads=16, aug_q=False),
                             rngs=nnx.Rngs(0))
    gqa = Attention(2048, AttentionConfig(n_heads=32, n_kv_heads=16), rngs=nnx.Rngs(0))
    L = 256
    # The reported sizes are the bytes of the caches the layers really allocate, and the paper's head counts.
    sigma_cache = sigma.init_state(1, L)
    assert sigma.state_size(L) == sigma_cache["k"].nbytes + sigma_cache["v"].nbytes == L * (4 + 16) * 64 * 4
    gqa_cache = gqa.init_state(1, L)
    assert gqa.state_size(L) == gqa_cache["k"].nbytes + gqa_cache["v"].nbytes
    assert gqa.state_size(L) == L * (16 + 16) * 64 * 4  # so Sigma's cache is (4 + 16) / (16 + 16) = 62.5% of it


@pytest.mark.parametrize("n_kv", [3, 1])
def test_equal_k_and_v_heads_without_augq_is_gqa(n_kv):
    # Property 1 (§6.3) on the layer: the same weights in the GQA Attention layer give the same output.
    diff = make_layer(n_k_heads=n_kv, n_v_heads=n_kv, head_dim=4, v_head_dim=None, k_cache_dim=None, aug_q=False)
    gqa = Attention(D, AttentionConfig(n_heads=6, n_kv_heads=n_kv, head_dim=4), rngs=nnx.Rngs(5))
    x = make_x()
    assert rel_err(gqa(x), diff(x)) > 1e-2
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(gqa, name).kernel[...] = getattr(diff, name).kernel[...]
    assert_close("gqa", diff(x), gqa(x), 1e-5)


def test_duplicating_k_heads_to_v_heads_changes_nothing():
    # Property 2 (§6.3, App. E): copy K head 0 to the 3 V heads' K heads; each query head reads the same key.
    one_k = make_layer(k_cache_dim=None)
    three_k = make_layer(seed=3, k_cache_dim=None, n_k_heads=3)
    for name in ("q_proj", "v_proj", "o_proj"):
        getattr(three_k, name).kernel[...] = getattr(one_k, name).kernel[...]
    for name in ("gate", "up", "down"):
        getattr(three_k.aug_q, name).kernel[...] = getattr(one_k.aug_q, name).kernel[...]
    three_k.k_proj.kernel[...] = jnp.tile(one_k.k_proj.kernel[...], (1, 3))
    x = make_x()
    assert_close("dup", three_k(x), one_k(x), 1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_selective_v_decoding(renormalize):
    # Property 3 (§6.3): N >= T equals full attention; a smaller N changes the output once a query sees > N keys.
    x = make_x()
    full = make_layer(select_v_top_n=T, select_v_renormalize=renormalize)
    _, y = decode_all(full, x, prompt_len=4)
    assert_close("N >= T", y, full(x), 1e-5)
    few = make_layer(select_v_top_n=3, select_v_renormalize=renormalize)
    _, y_few = decode_all(few, x, prompt_len=4)
    assert_close("first 3 tokens", y_few[:, :3], full(x)[:, :3], 1e-5)
    assert rel_err(y_few[:, 3:], full(x)[:, 3:]) > 1e-3


def test_cache_overflow_raises_eagerly():
    layer = make_layer()
    state, _ = layer.prefill(layer.init_state(B, 4), make_x(T=4))
    with pytest.raises(ValueError, match="cache of 4 slots is full"):
        layer.decode_step(state, make_x(T=1)[:, 0])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n_k_heads": 4}, "n_k_heads=4 must divide n_q_heads=6"),
        ({"n_v_heads": 0}, "n_v_heads must be positive"),
        ({"k_cache_dim": 8}, "k_cache_dim=8 must not exceed head_dim=4"),
        ({"select_v_top_n": 0}, "select_v_top_n must be positive"),
        ({"aug_q_hidden": -1}, "aug_q_hidden must be positive"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **overrides)


def test_augq_default_width_is_one_and_a_half_d_model():
    layer = DiffQKVAttention(64, DiffQKVConfig(), rngs=nnx.Rngs(0))
    assert layer.aug_q.gate.kernel.shape == (64, 96) and layer.aug_q.down.kernel.shape == (96, 64)
    assert layer.head_dim == 8 and layer.k_up is None
