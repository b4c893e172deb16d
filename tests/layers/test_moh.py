"""MoH layer: all heads active at uniform gates == MHA, the load-balance loss on a hand-computed case, gate sums
under both scalings, deterministic ties, the parameter-free router's straight-through gradient, decode == parallel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.attention import Attention
from effarch.layers.aux_loss import collect_aux_losses
from effarch.layers.axes import Mixer
from effarch.layers.moh import MoHAttention, MoHConfig, load_balance
from tests.helpers.numerics import assert_close, rel_err

B, T, D, H, K = 2, 11, 15, 5, 6


def make_layer(seed=0, **overrides):
    config = MoHConfig(**{"n_heads": H, "n_kv_heads": None, "head_dim": K, "n_shared": 2, "top_k": 2, **overrides})
    return MoHAttention(D, config, rngs=nnx.Rngs(seed))


def make_x(seed=1, T=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D), np.float32))


def baseline_of(layer: MoHAttention) -> Attention:
    attn = Attention(D, layer.moh.attention_config(), rngs=nnx.Rngs(9))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(attn, name).kernel[...] = getattr(layer, name).kernel[...]
    return attn


def zero_routers(layer: MoHAttention):
    for lin in (layer.router, layer.shared_router, layer.stage_router):
        if lin is not None:
            lin.kernel[...] = jnp.zeros_like(lin.kernel[...])


def test_is_a_mixer():
    assert isinstance(make_layer(), Mixer)


@pytest.mark.parametrize("n_kv_heads", [None, 1])
@pytest.mark.parametrize("n_shared", [0, 1, 3])
def test_all_heads_active_uniform_gates_equals_mha(n_shared, n_kv_heads):
    # Code scaling at uniform router outputs: shared 1/h_s · h_s, routed renormalised · E, α = 1/2 · 2: every gate 1.
    layer = make_layer(n_shared=n_shared, top_k=H - n_shared, n_kv_heads=n_kv_heads)
    zero_routers(layer)
    x = make_x()
    routing = layer.route(x, layer.project_qkv(x, jnp.arange(T))[0])
    np.testing.assert_allclose(np.asarray(routing.gates), 1.0, rtol=1e-6)
    assert_close("moh == mha", layer(x), baseline_of(layer)(x), 1e-5)


def test_random_gates_differ_from_mha():
    # Not vacuous: with trained-looking (random) routers and half the routed heads the output is not MHA's.
    layer = make_layer(top_k=1)
    x = make_x()
    assert rel_err(layer(x), baseline_of(layer)(x)) > 1e-2


def test_load_balance_hand_computed():
    # E = 3 routed heads, 2 tokens, top-1: token 0 picks head 0, token 1 picks head 1.
    probs = jnp.asarray([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    top_idx = jnp.asarray([[[0], [1]]])
    # f = (1/2, 1/2, 0), P = (0.3, 0.45, 0.25): Σ f P = 0.15 + 0.225 = 0.375; the code's loss is E times that.
    np.testing.assert_allclose(float(load_balance(probs, top_idx, paper_scaling=True)), 0.375, rtol=1e-6)
    np.testing.assert_allclose(float(load_balance(probs, top_idx, paper_scaling=False)), 1.125, rtol=1e-6)


@pytest.mark.parametrize("paper_scaling", [False, True])
def test_layer_stores_load_balance_from_its_router(paper_scaling):
    layer = make_layer(top_k=2, paper_scaling=paper_scaling)
    x = make_x()
    layer(x)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)  # [B, T, E]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[..., :2]
    f = np.stack([(top == i).any(-1).mean() for i in range(3)])
    expected = (f * p.mean((0, 1))).sum() * (1 if paper_scaling else 3)
    np.testing.assert_allclose(float(layer.load_balance[...]), expected, rtol=1e-5)
    assert collect_aux_losses(layer) == {"load_balance": layer.load_balance[...]}


@pytest.mark.parametrize("paper_scaling", [False, True])
def test_gate_sums(paper_scaling):
    top_k, n_shared = 2, 2
    layer = make_layer(top_k=top_k, n_shared=n_shared, paper_scaling=paper_scaling)
    x = make_x()
    routing = layer.route(x, layer.project_qkv(x, jnp.arange(T))[0])
    alpha = jax.nn.softmax(x @ layer.stage_router.kernel[...], axis=-1)
    shared_sum = jnp.sum(routing.gates[..., :n_shared], -1)
    routed_sum = jnp.sum(routing.gates[..., n_shared:], -1)
    if paper_scaling:
        # Eq. 3: shared gates sum to α1; routed gates are α2 times the selected softmax mass (not renormalised).
        top_mass = jnp.sum(jax.lax.top_k(routing.probs, top_k)[0], -1)
        assert_close("shared", shared_sum, alpha[..., 0], 1e-6)
        assert_close("routed", routed_sum, alpha[..., 1] * top_mass, 1e-6)
        assert float(jnp.max(top_mass)) < 1.0
    else:
        # Released code: shared 2·α1·h_s, routed 2·α2·k, so the mean active gate is 1 at α = 1/2.
        assert_close("shared", shared_sum, 2 * alpha[..., 0] * n_shared, 1e-6)
        assert_close("routed", routed_sum, 2 * alpha[..., 1] * top_k, 1e-6)


def test_topk_ties_pick_lower_heads_deterministically():
    layer = make_layer(top_k=2)
    zero_routers(layer)  # every routed head ties
    x = make_x()
    routing = layer.route(x, layer.project_qkv(x, jnp.arange(T))[0])
    np.testing.assert_array_equal(np.asarray(routing.heads), np.broadcast_to([0, 1, 2, 3], (B, T, 4)))


def test_parameter_free_router_binary_gates_and_straight_through():
    layer = make_layer(router="parameter_free", top_k=1)
    assert layer.router is None and layer.stage_router is None
    x = make_x()
    q = layer.project_qkv(x, jnp.arange(T))[0]
    routing = layer.route(x, q)
    np.testing.assert_array_equal(np.asarray(routing.gates), 1.0)  # exactly binary in the forward pass
    # Routed heads are the largest query norms among heads 2..4.
    norms = np.linalg.norm(np.asarray(q[:, :, 2:]), axis=-1)
    np.testing.assert_array_equal(np.asarray(routing.heads[..., 2]), 2 + norms.argmax(-1))
    # Straight-through: the gates' gradient reaches q_proj through the softmax of the norms.
    def loss(gate_scale_of_q):
        return jnp.sum(layer.route(x, q * gate_scale_of_q).gates)

    grad = jax.grad(loss)(jnp.ones((1, 1, H, 1)))
    assert float(jnp.max(jnp.abs(grad))) > 1e-4


@jax.jit
def _decode_step(layer, state, x_t):
    return layer.decode_step(state, x_t)


@pytest.mark.parametrize(
    "overrides",
    # The learned router with the dense implementation decodes in tests/conformance/.
    [{"implementation": "sparse", "block_size": 4, "n_kv_heads": 1},
     {"router": "parameter_free", "implementation": "sparse", "paper_scaling": True}],
    ids=["learned_sparse_mqa", "param_free_sparse"],
)
def test_prefill_then_decode_matches_call(overrides):
    layer = make_layer(**overrides)
    x = make_x()
    y_parallel = layer(x)
    state = layer.init_state(B, 13)
    state, y_a = layer.prefill(state, x[:, :5])
    outputs = [y_a]
    for t in range(5, T):
        state, y_t = _decode_step(layer, state, x[:, t])
        outputs.append(y_t[:, None])
    assert int(state["pos"]) == T
    assert_close("decode", jnp.concatenate(outputs, axis=1), y_parallel, 1e-5)


def test_sparse_layer_gradients_match_dense():
    # top_k = 2: with the code's renormalisation a single routed head's gate is p / p = 1, which has no gradient.
    dense = make_layer(top_k=2)
    sparse = make_layer(top_k=2, implementation="sparse", block_size=3)
    x = make_x()

    @jax.jit
    def grads(layer):
        return jax.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer)

    g_dense, g_sparse = nnx.state(grads(dense), nnx.Param), nnx.state(grads(sparse), nnx.Param)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_sparse), nnx.to_flat_state(g_dense), strict=True):
        assert_close("/".join(map(str, path)), a[...], b[...], 1e-5)
    assert float(jnp.max(jnp.abs(g_dense["router"]["kernel"][...]))) > 0  # the gates are trained


def test_state_size_is_the_full_kv_cache():
    layer = make_layer(n_kv_heads=1)
    assert layer.state_size(100) == 2 * 100 * 1 * K * 4
    state = layer.init_state(1, 100)
    assert state["k"].nbytes + state["v"].nbytes == layer.state_size(100)


@pytest.mark.parametrize(
    "overrides, field",
    [({"n_shared": 5}, "n_shared"), ({"top_k": 4}, "top_k"), ({"top_k": 0}, "top_k"), ({"n_heads": 1}, "n_heads"),
     ({"n_kv_heads": 2}, "n_kv_heads"), ({"block_size": 0}, "block_size")],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"moh.{field}"):
        dataclasses.replace(MoHConfig(n_heads=H, n_shared=2, top_k=2), **overrides)
