"""Attention layer: bidirectional attention, GQA/MQA as repeated MHA, cross attention, RoPE, the KV cache's limits
and bf16 dtype, gradients vs the reference. Causal decoding == parallel and the rest of the Mixer protocol are in
tests/conformance/."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.axes import Mixer
from effarch.pallas_kernels.attention import attention_reference
from tests.helpers.numerics import assert_close, rel_err

B, T, D, H, K = 2, 11, 15, 6, 6


def make_layer(seed=0, **overrides):
    config = AttentionConfig(**{"n_heads": H, "n_kv_heads": 3, "head_dim": K, **overrides})
    return Attention(D, config, rngs=nnx.Rngs(seed))


def make_x(seed=1, T=T, width=D):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, width), np.float32))


def kernel(linear):
    return linear.kernel[...]


# The causal layer is checked in tests/conformance/; here bidirectional attention sees the future.
@pytest.mark.parametrize("causal", [False])
def test_call_causality(causal):
    layer = make_layer(causal=causal)
    x = make_x()
    x_changed = x.at[:, 7].set(make_x(seed=2)[:, 7])
    y, y_changed = layer(x), layer(x_changed)
    past_err = rel_err(y_changed[:, :7], y[:, :7])
    if causal:
        assert past_err == 0.0, past_err
    else:
        assert past_err > 1e-3, past_err
    assert rel_err(y_changed[:, 7:], y[:, 7:]) > 1e-3


@pytest.mark.parametrize("n_kv_heads", [3, 1])
@pytest.mark.parametrize("rope", [True, False])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads, rope):
    gqa = make_layer(n_kv_heads=n_kv_heads, rope=rope)
    mha = make_layer(seed=7, n_kv_heads=None, rope=rope)
    group = H // n_kv_heads

    def repeat_heads(w_DF):
        # Query head h reads KV head h // group, so KV head j is copied to query heads j*group ... j*group+group-1.
        return jnp.repeat(w_DF.reshape(D, n_kv_heads, K), group, axis=1).reshape(D, H * K)

    mha.q_proj.kernel[...] = kernel(gqa.q_proj)
    mha.o_proj.kernel[...] = kernel(gqa.o_proj)
    mha.k_proj.kernel[...] = repeat_heads(kernel(gqa.k_proj))
    mha.v_proj.kernel[...] = repeat_heads(kernel(gqa.v_proj))
    x = make_x()
    assert_close("gqa vs mha", gqa(x), mha(x), 1e-5)
    # The weight copy matters: the freshly initialised MHA layer differs.
    assert rel_err(gqa(x), make_layer(seed=7, n_kv_heads=None, rope=rope)(x)) > 1e-2


def test_cross_attention_matches_hand_computation():
    S, Dc = 13, 7
    layer = Attention(D, AttentionConfig(n_heads=H, n_kv_heads=3, head_dim=K, causal=False), rngs=nnx.Rngs(0),
                      context_dim=Dc)
    x, context = make_x(), make_x(seed=3, T=S, width=Dc)
    q = jnp.einsum("BTD,DF->BTF", x, kernel(layer.q_proj)).reshape(B, T, H, K)
    k = jnp.einsum("BSC,CF->BSF", context, kernel(layer.k_proj)).reshape(B, S, 3, K)
    v = jnp.einsum("BSC,CF->BSF", context, kernel(layer.v_proj)).reshape(B, S, 3, K)
    o = attention_reference(q, k, v, causal=False).reshape(B, T, H * K)
    expected = jnp.einsum("BTF,FD->BTD", o, kernel(layer.o_proj))
    y = layer(x, context)
    assert y.shape == (B, T, D)
    assert_close("cross", y, expected, 1e-5)
    assert rel_err(layer(x, context.at[:, 12].add(1.0)), y) > 1e-3
    with pytest.raises(ValueError, match="context"):
        layer(x)


def test_cross_attention_rejects_causal():
    with pytest.raises(ValueError, match="causal"):
        Attention(D, AttentionConfig(causal=True, n_heads=3), rngs=nnx.Rngs(0), context_dim=7)
    self_layer = make_layer(causal=True)
    with pytest.raises(ValueError, match="causal"):
        self_layer(make_x(), make_x(seed=3, T=13))


def test_rope_scores_depend_only_on_position_difference():
    layer = make_layer()
    x = make_x()
    positions = jnp.arange(T)

    def scores(pos):
        q, k, _ = layer.project_qkv(x, pos)
        return jnp.einsum("BTHGK,BSHK->BHGTS", q.reshape(B, T, 3, 2, K), k)

    assert_close("shifted by 17", scores(positions + 17), scores(positions), 1e-5)
    # Not vacuous: stretching the positions changes the relative distances and so the scores.
    assert rel_err(scores(2 * positions), scores(positions)) > 1e-2


@pytest.mark.parametrize("rope", [False, True])
def test_noncausal_permutation_equivariance_only_without_rope(rope):
    # Without positions, bidirectional attention commutes with permuting the tokens; RoPE breaks that symmetry.
    layer = make_layer(causal=False, rope=rope)
    x = make_x()
    perm = np.random.default_rng(0).permutation(T)
    err = rel_err(layer(x[:, perm]), layer(x)[:, perm])
    if rope:
        assert err > 1e-3, err
    else:
        assert err < 1e-5, err


@jax.jit
def _decode_step(layer, state, x_t):
    return layer.decode_step(state, x_t)


def test_decode_past_cache_end():
    layer = make_layer()
    x = make_x()
    state = layer.init_state(B, 3)
    state, _ = layer.prefill(state, x[:, :3])
    with pytest.raises(ValueError, match="full"):
        layer.decode_step(state, x[:, 3])
    with pytest.raises(ValueError, match="full"):
        layer.prefill(layer.init_state(B, 3), x[:, :4])
    # Under jit the position is abstract: the output is poisoned with NaN instead.
    _, y_t = _decode_step(layer, state, x[:, 3])
    assert np.all(np.isnan(np.asarray(y_t)))


def test_state_size_and_cache_dtype():
    layer = make_layer()
    assert layer.state_size(13) == 2 * 13 * 3 * K * 4
    state = layer.init_state(1, 13)
    assert layer.state_size(13) == state["k"].nbytes + state["v"].nbytes
    assert state["pos"].dtype == jnp.int32 and state["pos"].shape == ()
    assert layer.state_size(13, cache_dtype=jnp.bfloat16) == 2 * 13 * 3 * K * 2
    state = layer.init_state(B, 13, cache_dtype=jnp.bfloat16)
    state, y_t = layer.decode_step(state, make_x()[:, 0])
    assert state["k"].dtype == jnp.bfloat16 and y_t.dtype == jnp.float32
    assert_close("bf16 cache", y_t, layer(make_x())[:, 0], 2e-2)


def test_mixer_protocol_and_decoder_checks():
    assert isinstance(make_layer(), Mixer)
    with pytest.raises(ValueError, match="causal self-attention"):
        make_layer(causal=False).init_state(B, 13)


def test_grad_through_layer_matches_reference_implementation():
    x = make_x()
    cotangent = make_x(seed=4)

    def loss(layer, x):
        return jnp.sum(layer(x) * cotangent)

    grads = {}
    for impl in ("xla", "reference"):
        layer = make_layer(implementation=impl)
        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(layer, x)
    (g_layer, g_x), (g_layer_ref, g_x_ref) = grads["xla"], grads["reference"]
    assert_close("dx", g_x, g_x_ref, 1e-4)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        g, g_ref = kernel(getattr(g_layer, name)), kernel(getattr(g_layer_ref, name))
        assert_close(name, g, g_ref, 1e-4)
        assert np.max(np.abs(np.asarray(g_ref))) > 0.0


def test_param_logical_axes():
    layer = make_layer()
    axes = {name: getattr(layer, name).kernel.get_metadata()["logical_axes"]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert axes == {"q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
                    "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed")}
    assert kernel(layer.k_proj).shape == (D, 3 * K) and kernel(layer.q_proj).shape == (D, H * K)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_heads": 6, "n_kv_heads": 4}, "n_kv_heads"), ({"n_heads": 0}, "n_heads"), ({"head_dim": 0}, "head_dim"),
     ({"rope_theta": 0.0}, "rope_theta")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**kwargs)


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match="even"):
        Attention(D, AttentionConfig(n_heads=3, head_dim=5), rngs=nnx.Rngs(0))
    no_rope = Attention(D, AttentionConfig(n_heads=3, head_dim=5, rope=False), rngs=nnx.Rngs(0))
    assert no_rope(make_x()).shape == (B, T, D)
