"""DuoAttention: the gated attention layer (`attention.duo_gates`: α·full + (1 − α)·streaming per KV head) and its
deployment as the `duo` KV policy (layers/kv_policies/duo.py). The gate training (train.objective duo) is in
tests/train/test_duo_train.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.kv_policies import DuoPolicy, PolicyError, make_policy
from effarch.layers.kv_policies.base import reads_of
from effarch.pallas_kernels.attention import dot_product_attention
from tests.layers.test_kv_policies import selected_tokens

B, T, D, V = 2, 16, 16, 32
SINK, WINDOW = 2, 4


def gated(n_heads=4, n_kv_heads=2, **kw) -> AttentionConfig:
    return AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, duo_gates=True, duo_sink=SINK, duo_window=WINDOW,
                           **kw)


def x_of(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


def masked_attention(layer: Attention, x, visible_TS: np.ndarray):
    """The layer's attention under a hand-written [T, T] mask, through the jnp reference, and o_proj."""
    q, k, v = layer.project_qkv(x, jnp.arange(T))
    mask = jnp.broadcast_to(jnp.asarray(visible_TS)[None], (B, T, T))
    o = dot_product_attention(q, k, v, causal=False, mask=mask, implementation="reference")
    return layer.o_proj(o.reshape(B, T, -1))


def causal_TS():
    return np.tril(np.ones((T, T), bool))


def streaming_TS():
    t, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j <= t) & ((j < SINK) | (t - j < WINDOW))


@nnx.jit(static_argnums=2)
def decoded(layer: Attention, x, n_prompt: int):
    """A prefill of n_prompt tokens, then one decode step per token (lax.scan)."""
    st, first = layer.prefill(layer.init_state(B, T), x[:, :n_prompt])
    _, rest = jax.lax.scan(lambda st, x_t: layer.decode_step(st, x_t), st, x[:, n_prompt:].swapaxes(0, 1))
    return jnp.concatenate([first, rest.swapaxes(0, 1)], axis=1)


def test_gates_at_one_equal_full_attention():
    layer, x = Attention(D, gated(), rngs=nnx.Rngs(0)), x_of()
    np.testing.assert_array_equal(np.asarray(layer.duo_gate[...]), 1.0)  # the official initial_value
    want = masked_attention(layer, x, causal_TS())
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=1e-5)  # decoding at gates 1: tests/conformance/
    # ... and to the layer without gates, same weights
    plain = Attention(D, AttentionConfig(n_heads=4, n_kv_heads=2), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-6, rtol=1e-6)


def test_gates_at_zero_equal_streaming_attention():
    layer, x = Attention(D, gated(), rngs=nnx.Rngs(0)), x_of(1)
    layer.duo_gate[...] = jnp.zeros(2)
    want = masked_attention(layer, x, streaming_TS())  # sinks {0, 1} and the last 4 tokens, the current one included
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decoded(layer, x, 7), want, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(want - masked_attention(layer, x, causal_TS())))) > 1e-3  # the windows matter


@pytest.mark.slow  # the default suite: gates 1 and 0 above, decoding at gates 1 in tests/conformance/
def test_mix_is_per_kv_head_on_outputs():
    # Gate (a, b) on KV heads 0, 1 (query heads 0-1, 2-3): each query head's output is its KV head's
    # α·full + (1 − α)·streaming, before o_proj; prefill in pieces and decoding give the same function.
    layer, x = Attention(D, gated(), rngs=nnx.Rngs(0)), x_of(2)
    a = jnp.array([0.3, 0.8])
    layer.duo_gate[...] = a
    q, k, v = layer.project_qkv(x, jnp.arange(T))

    def heads(visible):
        mask = jnp.broadcast_to(jnp.asarray(visible)[None], (B, T, T))
        return dot_product_attention(q, k, v, causal=False, mask=mask, implementation="reference")

    alpha = jnp.repeat(a, 2)[None, None, :, None]
    o = alpha * heads(causal_TS()) + (1 - alpha) * heads(streaming_TS())
    want = layer.o_proj(o.reshape(B, T, -1))
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decoded(layer, x, 6), want, atol=1e-5, rtol=1e-5)
    # The output is affine in each gate: its gradient is the full-minus-streaming output of that head's group.
    c = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, D)), jnp.float32)
    graphdef, params = nnx.split(layer)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) * c))(params)["duo_gate"][...]
    diff = (heads(causal_TS()) - heads(streaming_TS())).reshape(B, T, 2, 2, -1)  # [B, T, Hkv, G, K]
    w = layer.o_proj.kernel[...].reshape(2, 2, -1, D)  # [Hkv, G, K, D]
    np.testing.assert_allclose(grad, jnp.einsum("btgjk,gjkd,btd->g", diff, w, c), rtol=1e-4, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="duo_gates needs causal self attention"):
        AttentionConfig(duo_gates=True, causal=False)
    with pytest.raises(ValueError, match="duo_sink must be >= 0 and duo_window >= 1"):
        AttentionConfig(duo_window=0)


# --- the duo KV policy ---------------------------------------------------------------------------------------------


def model(gates=None, n_layers=2) -> DecoderLM:
    m = DecoderLM(ModelConfig(vocab_size=V, d_model=D, n_layers=n_layers, attention=gated()), rngs=nnx.Rngs(0))
    for block, g in zip(m.blocks, gates or (), strict=False):
        block.mixer.duo_gate[...] = jnp.asarray(g, jnp.float32)
    return m


GATES = ([0.9, 0.1], [0.3, 0.6])


@pytest.mark.parametrize("opts, want", [(["threshold=0.5"], "0:10,1:01"), (["threshold=0.3"], "0:10,1:11"),
                                        (["full=0.25"], "0:10,1:00"), ([], "0:10,1:01"),  # full 0.5 by default
                                        (["full=0.75"], "0:10,1:11"), (["full=0"], "0:00,1:00")])
def test_heads_chosen_by_threshold_or_fraction(opts, want):
    m = model(GATES)
    assert m.set_kv_policy(make_policy("duo", opts)) == [0, 1]
    assert m.kv_policy.describe().endswith(f"full_heads={want}")
    assert (m.kv_policy.budget, m.kv_policy.n_sink) == (SINK + WINDOW, SINK)  # the model's training sizes


def test_selection_and_reads_by_hand():
    # Layer 1 of GATES at full=0.5: KV head 1 full, head 0 streaming (sink {0} + the last 4 tokens).
    p1 = DuoPolicy(budget=5, n_sink=1, _full_heads=((True, False), (False, True)), _layer=1)
    k = jnp.zeros((1, 12, 2, 4))
    (part,), _ = p1.select({}, jnp.zeros((1, 4, 4)), k, jnp.int32(10))
    assert selected_tokens(part, g=0) == [0, 6, 7, 8, 9]
    assert selected_tokens(part, g=1) == list(range(10))
    assert float(reads_of([part], jnp.int32(10))) == (5 + 10) / 2  # what attend reports: the mean per KV head
    no_full = dataclasses.replace(p1, _full_heads=((False, False),) * 2)
    (part,), _ = no_full.select({}, jnp.zeros((1, 4, 4)), k, jnp.int32(10))
    assert part.idx.shape == (1, 1, 5)  # one shared list of the budget: O(budget) gathers


@nnx.jit(static_argnums=2)
def decoded_logits(m: DecoderLM, toks, n_prompt: int):
    """Logits [B, T - 1, V]: a dense prefill of n_prompt tokens, then one decode step each."""
    st, first = m.prefill(m.init_state(B, T), toks[:, :n_prompt])
    _, rest = jax.lax.scan(lambda st, t: m.decode_step(st, t), st, toks[:, n_prompt:-1].T)
    return jnp.concatenate([first, rest.swapaxes(0, 1)], axis=1)


@pytest.mark.slow  # fast representative: tests/arches/test_kv_policy_decode.py (duo full=1 == the full cache)
def test_full_fraction_one_is_the_full_cache_and_zero_is_the_window():
    toks = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    m = model(GATES)
    plain = DecoderLM(ModelConfig(vocab_size=V, d_model=D, n_layers=2,
                                  attention=AttentionConfig(n_heads=4, n_kv_heads=2)), rngs=nnx.Rngs(0))
    m.set_kv_policy(make_policy("duo", ["full=1"]))  # every head reads its whole cache: the full-attention model
    np.testing.assert_allclose(decoded_logits(m, toks, 5), plain(toks)[:, : T - 1], atol=2e-5, rtol=1e-4)
    m.set_kv_policy(make_policy("duo", ["full=0", "budget=6", "n_sink=2"]))
    plain.set_kv_policy(make_policy("window", ["budget=6", "n_sink=2"]))
    np.testing.assert_allclose(decoded_logits(m, toks, 5), decoded_logits(plain, toks, 5), atol=2e-5, rtol=1e-4)


def test_errors():
    plain = DecoderLM(ModelConfig(vocab_size=V, d_model=D, n_layers=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kv policy duo: the model has no DuoAttention gates \(layers \[0, 1\]: "
                                         r"Attention\); train them with model.attention.duo_gates"):
        plain.set_kv_policy(make_policy("duo"))
    assert plain.kv_policy is None
    abstract = nnx.eval_shape(lambda: DecoderLM(ModelConfig(vocab_size=V, d_model=D, n_layers=2,
                                                            attention=gated()), rngs=nnx.Rngs(0)))
    abstract.set_kv_policy(make_policy("duo"))  # the CLI's check before a checkpoint is read: sizes only
    with pytest.raises(PolicyError, match=r"kv policy duo: threshold must be in \[0, 1\] \(gates are\), got 1.5"):
        make_policy("duo", ["threshold=1.5"])
    with pytest.raises(PolicyError, match="kv policy duo: threshold must be a number, got 'high'"):
        make_policy("duo", ["threshold=high"])
    with pytest.raises(PolicyError, match="kv policy duo: give full=P .* or threshold=T, not both"):
        make_policy("duo", ["threshold=0.5", "full=0.5"])
    with pytest.raises(PolicyError, match=r"kv policy duo: full must be a fraction in \[0, 1\], got 2.0"):
        make_policy("duo", ["full=2"])
    with pytest.raises(PolicyError, match=r"kv policy duo: n_sink must be in \[0, budget=4\)"):
        make_policy("duo", ["budget=4", "n_sink=4"])
    with pytest.raises(PolicyError, match="give it to a model with gates"):
        DuoPolicy().select({}, jnp.zeros((1, 4, 4)), jnp.zeros((1, 8, 2, 4)), jnp.int32(3))
    m = model(GATES)
    m.set_kv_policy(make_policy("duo"))
    hash(m.kv_policy)  # static configuration, with its chosen heads: a model's graphdef holds it
