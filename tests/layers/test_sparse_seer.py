"""seer (layers/sparse_seer.py): the gate is SeerAttention's AttnGate written out in numpy (pre-RoPE pooled q / k,
the linear maps of either shape, RoPE at block starts), the loss is KLDivLoss('mean') on the kept rows, the
distillation pass outputs dense attention and trains only the gate, the inference pass is attention over the gate's
per-head top-k / threshold selection with the diagonal, decoding equals the parallel form of each prefix (dense
decoding with distill), the gate learns in a few steps, and bad fields fail in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from effarch.layers import sparse_select
from effarch.layers.attention import Attention
from effarch.layers.aux_loss import collect_aux_losses
from effarch.layers.sparse_attention import SparseAttention
from effarch.layers.sparse_seer import distillation_loss
from effarch.pallas_kernels.block_sparse import block_stats_attention
from tests.conformance import test_mixers as conformance
from tests.helpers.numerics import assert_close
from tests.layers.test_sparse_attention import dense_masked
from tests.layers.test_sparse_topk import run_pieces

B, D = 2, 24
SEER = conformance.VARIANTS["sparse_attention[seer]"].configs["sparse_attention"]  # blocks of 4, top 3, gate 4 != 6
SEER_SQUARE = dataclasses.replace(SEER, gate_dim=None)  # dg = K: no query linear, keys per query head (the paper's)


def make_x(t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D)), jnp.float32)


def rope_np(x, pos, theta=10000.0):
    """RoPE on the last axis at positions pos [R] (pairs (i, i + d/2), as layers/rope.py and HF's rotate_half)."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def gate_np(layer: SparseAttention, x) -> np.ndarray:
    """S [B, Hq, nB, nB] from the AttnGate recipe: ceil-mode pools of the pre-RoPE q (avg) and k (max | min | avg),
    MultiHeadLinear maps (k per query head with k repeated when dg = K, else q per query head and k per KV head,
    repeated), RoPE at each block's first position, q·k / sqrt(dg)."""
    pol = layer.policy
    T = x.shape[1]
    q = np.asarray(layer._heads(layer.q_proj(x), layer.config.n_heads), np.float64)
    k = np.asarray(layer._heads(layer.k_proj(x), layer.config.kv_heads), np.float64)
    bs, nb = pol.block, -(-T // pol.block)
    blocks = [slice(i * bs, min((i + 1) * bs, T)) for i in range(nb)]
    qp = np.stack([q[:, s].mean(1) for s in blocks], 1)
    kp = np.stack([np.concatenate([k[:, s].max(1), k[:, s].min(1), k[:, s].mean(1)], -1) for s in blocks], 1)
    Hq, Hkv = q.shape[2], k.shape[2]
    rep = Hq // Hkv
    wk = np.asarray(pol.k_gate[...], np.float64)
    if pol.q_gate is None:
        kt = np.einsum("bjhc,hce->bjhe", np.repeat(kp, rep, axis=2), wk)
        qt = qp
    else:
        qt = np.einsum("bjhk,hke->bjhe", qp, np.asarray(pol.q_gate[...], np.float64))
        kt = np.repeat(np.einsum("bjhc,hce->bjhe", kp, wk), rep, axis=2)
    starts = np.arange(nb) * bs
    qt, kt = rope_np(qt, starts), rope_np(kt, starts)
    return np.einsum("bihe,bjhe->bhij", qt, kt) / np.sqrt(qt.shape[-1])


@pytest.mark.parametrize("cfg", [SEER, SEER_SQUARE], ids=["q_and_k_linear", "k_linear_per_query_head"])
def test_gate_is_the_attn_gate_recipe(cfg):
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x(21)
    _, _, _, q_raw, k_raw = jax.jit(lambda x: layer.project_qkv_raw(x, jnp.arange(21)))(x)
    pol = layer.policy
    got = jax.jit(lambda q, k: pol.scores(sparse_select.block_pool(q, pol.block), jnp.arange(6),
                                          pol.pool_keys(k, pol.block)))(q_raw, k_raw)
    np.testing.assert_allclose(got, gate_np(layer, x), rtol=1e-4, atol=1e-6)


def test_distillation_loss_is_kl_div_mean_on_the_kept_rows():
    """torch.nn.KLDivLoss()(log_softmax(S masked with -1e9), GT): mean of xlogy(GT, GT) - GT·log p over every element
    of the rows nQ // 4 onwards; 0 when the gate predicts GT exactly."""
    rng = np.random.default_rng(0)
    nq = 7
    causal = np.tril(np.ones((nq, nq), bool))
    scores = rng.standard_normal((2, 3, nq, nq))
    raw = np.where(causal, rng.random((2, 3, nq, nq)), 0.0)
    s_masked = np.where(causal, scores, -1e9)
    log_p = s_masked - np.log(np.exp(s_masked - s_masked.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - s_masked.max(-1, keepdims=True)
    gt = raw / raw.sum(-1, keepdims=True)
    xlogy = np.where(gt > 0, gt * np.log(np.where(gt > 0, gt, 1)), 0.0)
    expected = (xlogy - gt * log_p)[:, :, nq // 4:].mean()
    got = distillation_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(raw, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    perfect = np.where(causal, np.log(np.where(causal, gt, 1)), 0.0)
    assert abs(float(distillation_loss(jnp.asarray(perfect, jnp.float32), jnp.asarray(raw, jnp.float32)))) < 1e-6


def test_distillation_pass_is_dense_and_trains_only_the_gate():
    """distill: the output is the attention layer's on the same weights; the stored loss is gate_loss_scale · KL of
    the gate against block_stats_attention's map; its gradient reaches the gate only, the output's never does."""
    cfg = dataclasses.replace(SEER, distill=True, gate_loss_scale=10.0, implementation="reference")  # compiles faster
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    dense = Attention(D, cfg.attention_config(), rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(layer, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("policy")))))
    x = make_x(20)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(params, x):
        mixer = nnx.merge(graphdef, params, rest, copy=True)
        y = mixer(x)
        return y, collect_aux_losses(mixer)["policy/distill_loss"]

    @jax.jit
    def run(params, x):
        (y, aux), vjp = jax.vjp(lambda p: forward(p, x), params)
        (g_aux,) = vjp((jnp.zeros_like(y), jnp.ones_like(aux)))
        (g_out,) = vjp((jnp.ones_like(y), jnp.zeros_like(aux)))
        mixer = nnx.merge(graphdef, params, rest, copy=True)
        q, k, v, q_raw, k_raw = mixer.project_qkv_raw(x, jnp.arange(20))
        _, stats = block_stats_attention(q, k, v, q_block=4, kv_block=4, implementation="reference")
        s = mixer.policy.scores(sparse_select.block_pool(q_raw, 4), jnp.arange(5), mixer.policy.pool_keys(k_raw, 4))
        return y, aux, g_aux, g_out, dense(x), 10.0 * distillation_loss(s, stats)

    y, aux, g_aux, g_out, y_dense, expected_aux = run(params, x)
    assert_close("distill output", y, y_dense, 1e-5)
    np.testing.assert_allclose(aux, expected_aux, rtol=1e-5)
    for path, g in nnx.to_flat_state(g_aux):
        gate = path[0] == "policy"
        assert (float(jnp.abs(g[...]).max()) > 0) == gate, path  # the gate only, and all of it
    for path, g in nnx.to_flat_state(g_out):
        assert path[0] != "policy" or float(jnp.abs(g[...]).max()) == 0, path


@pytest.mark.parametrize("cfg", [SEER, dataclasses.replace(SEER_SQUARE, gate_threshold=0.15, sink_blocks=1)],
                         ids=["top_k", "threshold"])
def test_inference_pass_is_attention_over_the_gate_selection(cfg):
    """Per query head: the diagonal block (and the sinks), then the top-k of the gate's raw scores among J < I, or
    the J < I whose softmax over the causal row exceeds τ."""
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    T, bs = 22, cfg.block_size
    x = make_x(T)
    s = gate_np(layer, x)
    nb = s.shape[-1]
    vis = np.zeros((B, cfg.n_heads, T, T), bool)
    for b, h, i in np.ndindex(B, cfg.n_heads, nb):
        forced = {i} | set(range(min(cfg.sink_blocks, i + 1)))
        cand = [j for j in range(i) if j not in forced]
        if cfg.gate_threshold is None:
            chosen = forced | set(sorted(cand, key=lambda j: -s[b, h, i, j])[:max(cfg.top_k - len(forced), 0)])
        else:
            row = np.exp(s[b, h, i, :i + 1] - s[b, h, i, :i + 1].max())
            row /= row.sum()
            chosen = forced | {j for j in cand if row[j] > cfg.gate_threshold}
        for j in chosen:
            vis[b, h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
    vis &= np.tril(np.ones((T, T), bool))
    y, expected = jax.jit(lambda x: (layer(x), jax.vmap(lambda xb, vb: dense_masked(layer, xb[None], vb)[0])(
        x, jnp.asarray(vis))))(x)
    assert_close(cfg.pattern, y, expected, 1e-5)
    assert not vis.reshape(B, cfg.n_heads, -1).all(-1).any()  # sparse: some pair is not read


@pytest.mark.parametrize("cfg", [SEER, pytest.param(dataclasses.replace(SEER_SQUARE, gate_threshold=0.1),
                                                     marks=pytest.mark.slow)], ids=["top_k", "threshold"])
def test_decoding_equals_the_parallel_form_of_each_prefix(cfg):
    """As mean_topk's: a call ending at e gives the parallel form over x[:e + 1]; pieces and steps leave one state."""
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    T, pieces = 20, (0, 7, 20)  # the first piece ends inside a block
    x = make_x(T)
    ys, state, tok_state, tokens = run_pieces(layer, x, pieces)
    parallel = jax.jit(layer)
    for lo, hi, y in zip(pieces[:-1], pieces[1:], ys):
        assert_close(f"piece [{lo}, {hi})", y, parallel(x[:, :hi])[:, lo:hi], 1e-5)
    ends = np.arange(cfg.block_size - 1, T, cfg.block_size)
    assert_close("block ends, token by token", tokens[:, ends], parallel(x)[:, ends], 1e-5)
    for i, (u, w) in enumerate(zip(jax.tree.leaves(state), jax.tree.leaves(tok_state))):
        assert_close(f"state leaf {i}", u, w, 1e-5)
    assert layer.state_size(200) == 2 * layer.state_size(100)


@pytest.mark.slow
def test_distillation_decoding_is_the_dense_parallel_form():
    layer = SparseAttention(D, dataclasses.replace(SEER, distill=True), rngs=nnx.Rngs(0))
    x = make_x(20)
    ys, state, tok_state, tokens = run_pieces(layer, x, (0, 7, 13, 20))
    y = nnx.jit(lambda layer, x: layer(x))(layer, x)  # nnx.jit: the pass writes the layer's AuxLoss
    assert_close("pieces", jnp.concatenate(ys, 1), y, 1e-5)
    assert_close("tokens", tokens, y, 1e-5)


def test_the_gate_learns_the_block_map():
    """40 Adam steps (lr 1e-2) on the distillation loss of one frozen layer cut the KL by more than half."""
    cfg = dataclasses.replace(SEER_SQUARE, distill=True, gate_loss_scale=1.0, block_size=2)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x(32, seed=3)
    graphdef, gate, rest = nnx.split(layer, nnx.All(nnx.Param, nnx.PathContains("policy")), ...)
    tx = optax.adam(1e-2)

    def loss(gate):
        mixer = nnx.merge(graphdef, gate, rest, copy=True)
        mixer(x)
        return collect_aux_losses(mixer)["policy/distill_loss"]

    @jax.jit
    def train(gate):
        def step(carry, _):
            gate, opt = carry
            value, g = jax.value_and_grad(loss)(gate)
            updates, opt = tx.update(g, opt)
            return (optax.apply_updates(gate, updates), opt), value
        return jax.lax.scan(step, (gate, tx.init(gate)), None, length=40)[1]

    values = np.asarray(train(gate))
    assert values[-1] < 0.5 * values[0], values[[0, 10, 20, 39]]


@pytest.mark.parametrize("override, message", [
    ("gate_dim=0", "sparse_attention.gate_dim must be positive"),
    ("gate_loss_scale=-1", "sparse_attention.gate_loss_scale must be >= 0"),
    ("gate_threshold=1.5", "sparse_attention.gate_threshold must be in [0, 1)"),
])
def test_bad_fields_fail_in_one_line(override, message):
    from effarch.train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config([], ["model.sparse_attention.pattern=seer", f"model.sparse_attention.{override}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_odd_gate_width_with_rope_fails_in_one_line():
    with pytest.raises(ValueError, match=r"^sparse_attention.gate_dim=5 must be even") as e:
        SparseAttention(D, dataclasses.replace(SEER, gate_dim=5), rngs=nnx.Rngs(0))
    assert "\n" not in str(e.value)
