"""The decoder LM around its mixers: decoding and causality through the blocks, layouts, norms, remat. Each mixer's
own protocol (decoding == parallel, causality, state sizes, ...) is checked in tests/conformance/."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.mlp import MLPConfig
from tests.conformance.test_mixers import small_config
from tests.helpers.numerics import assert_close

V, T = 37, 19


def make(mixers, **kw) -> DecoderLM:
    """An LM of the given layers at the registry's small configs (arches/registry.py)."""
    return DecoderLM(small_config(vocab_size=V, n_layers=len(mixers), mixers=tuple(mixers), **kw), rngs=nnx.Rngs(0))


def tokens(seed=0, b=2, t=T):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def test_prefill_then_decode_equals_forward_and_is_causal():
    # The blocks thread one state per layer through prefill and decode_step (a recurrent and an attention layer,
    # with MLPs); changing token 11 changes no logit before it.
    model = make(["based", "attention"], mlp=MLPConfig("swiglu"))
    x = tokens()
    full = jax.jit(lambda m, x: m(x))(model, x)
    state, logits = model.prefill(model.init_state(2, T), x[:, :7])
    outs = [logits]
    step = jax.jit(lambda m, s, t: m.decode_step(s, t))
    for t in range(7, T):
        state, lt = step(model, state, x[:, t])
        outs.append(lt[:, None])
    assert_close("decode", jnp.concatenate(outs, 1), full, rtol=1e-5)
    changed = jax.jit(lambda m, x: m(x))(model, x.at[:, 11].set((x[:, 11] + 1) % V))
    np.testing.assert_array_equal(np.asarray(changed[:, :11]), np.asarray(full[:, :11]))
    assert not np.allclose(np.asarray(changed[:, 11:]), np.asarray(full[:, 11:]))
    assert model.state_size(100) == sum(b.mixer.state_size(100) for b in model.blocks) > 0


def test_hybrid_layout_repeats_the_mixer_list():
    cfg = ModelConfig(n_layers=7, mixers=("base_conv", "based", "sliding_window", "base_conv", "base_conv"))
    assert cfg.layer_mixers() == ("base_conv", "based", "sliding_window", "base_conv", "base_conv", "base_conv",
                                  "based")


def test_srms_norm_and_sglu_block():
    model = make(["lightning"], norm="srms", mlp=MLPConfig("sglu"))
    params = nnx.state(model, nnx.Param)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert not any("norm" in n for n in names), names  # SRMSNorm has no weight
    assert any("u_proj" in n for n in names)
    x = tokens()
    grads = jax.grad(lambda m: jnp.mean(m(x)))(model)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


@pytest.mark.slow  # ~7 s: the slow suite (the default suite's 10-minute budget)
def test_remat_gives_same_gradients():
    a, b = make(["attention", "base_conv"]), make(["attention", "base_conv"], remat=True)
    x = tokens()
    ga = jax.grad(lambda m: jnp.mean(m(x) ** 2))(a)
    gb = jax.grad(lambda m: jnp.mean(m(x) ** 2))(b)
    for u, w in zip(jax.tree.leaves(nnx.state(ga, nnx.Param)), jax.tree.leaves(nnx.state(gb, nnx.Param))):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-5, atol=1e-7)
