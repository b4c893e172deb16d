"""mean_topk (layers/sparse_topk.py) and the shared selection (layers/sparse_select.py): the parallel form is softmax
attention over the blocks a brute-force reading of the rule picks, the lists stay causal, unique and within bounds,
decoding equals the parallel form of each prefix (the documented difference from the whole sequence's), a top-k
covering every block is the attention layer, and bad fields fail in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers import sparse_select
from effarch.layers.attention import Attention
from effarch.layers.sparse_attention import SparseAttention
from tests.conformance import test_mixers as conformance
from tests.helpers.numerics import assert_close
from tests.layers.test_sparse_attention import dense_masked

B, D = 2, 24
TOPK = conformance.VARIANTS["sparse_attention[mean_topk]"].configs["sparse_attention"]  # blocks of 4, top 3, 1 sink


def make_x(t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D)), jnp.float32)


def brute_force_visible(layer: SparseAttention, x) -> np.ndarray:
    """visible [B, Hq, T, T] from the rule read literally: per KV head g and query block I, the score of J < I is
    max over g's query heads of mean(q in I) · mean(k in J); block I and the sink blocks always, then the best
    candidates up to k blocks; causal inside."""
    c = layer.sparse
    T = x.shape[1]
    q, k, _ = (np.asarray(a, np.float64) for a in layer.project_qkv(x, jnp.arange(T)))
    Hq, Hkv, bs = q.shape[2], k.shape[2], c.block_size
    nb = -(-T // bs)
    n_keep = c.top_k if c.density is None else sparse_select.density_k(nb, c.density)
    vis = np.zeros((x.shape[0], Hq, T, T), bool)
    for b in range(x.shape[0]):
        for g in range(Hkv):
            heads = range(g * (Hq // Hkv), (g + 1) * (Hq // Hkv))
            for i in range(nb):
                q_mean = q[b, i * bs:(i + 1) * bs].mean(0)
                forced = {i} | set(range(min(c.sink_blocks, i + 1)))
                candidates = [j for j in range(i) if j not in forced]
                scores = [[q_mean[h] @ k[b, j * bs:(j + 1) * bs, g].mean(0) for h in heads] for j in candidates]
                scores = [max(s) if c.score_reduce == "max" else np.mean(s) for s in scores]
                best = [candidates[n] for n in np.argsort(-np.asarray(scores), kind="stable")]
                chosen = forced | set(best[:max(n_keep - len(forced), 0)])
                for j in chosen:
                    vis[b, list(heads), i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
    return vis & np.tril(np.ones((T, T), bool))


@pytest.mark.parametrize("cfg, t", [
    (TOPK, 21),
    (dataclasses.replace(TOPK, density=0.5, sink_blocks=0, score_reduce="mean", block_size=3), 20),
], ids=["top_k_sink_gqa", "density_mean_reduce"])
def test_parallel_form_is_attention_over_the_brute_force_selection(cfg, t):
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x(t)
    vis = brute_force_visible(layer, x)
    assert vis.any(-1).all()  # every token sees something (its own block)
    y, expected = jax.jit(lambda x: (layer(x), jax.vmap(lambda xb, vb: dense_masked(layer, xb[None], vb)[0])(
        x, jnp.asarray(vis))))(x)
    assert_close("mean_topk", y, expected, 1e-5)


def test_lists_are_causal_unique_and_keep_the_diagonal_and_sinks():
    rng = np.random.default_rng(0)
    nb, kmax = 9, 4
    scores = jnp.asarray(rng.standard_normal((2, 3, nb, nb)), jnp.float32)
    topk = jax.jit(sparse_select.topk_lists, static_argnames=("kmax", "sink_blocks"))
    idx, cnt = (np.asarray(a) for a in topk(scores, jnp.arange(nb), 4, kmax=kmax, sink_blocks=2))
    assert idx.shape == (2, 3, nb, kmax)
    for b, h, i in np.ndindex(2, 3, nb):
        listed = idx[b, h, i, :cnt[b, h, i]]
        assert cnt[b, h, i] == min(4, i + 1) and len(set(listed)) == len(listed)
        assert set(listed) >= {i} | set(range(min(2, i + 1))) and (listed <= i).all()
        rest = [j for j in listed if j != i and j >= 2]  # the content's choices: the best of the candidates
        others = [j for j in range(2, i) if j not in rest]
        if rest and others:
            assert min(scores[b, h, i, rest]) >= max(scores[b, h, i, others])
    threshold = jax.jit(sparse_select.threshold_lists, static_argnames=("threshold",))
    t_idx, t_cnt = (np.asarray(a) for a in threshold(scores, jnp.arange(nb), threshold=0.2))
    s = np.where(np.tril(np.ones((nb, nb), bool)), np.asarray(scores, np.float64), -np.inf)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b, h, i in np.ndindex(2, 3, nb):
        expected = {j for j in range(i) if probs[b, h, i, j] > 0.2} | {i}
        assert set(t_idx[b, h, i, :t_cnt[b, h, i]]) == expected


def test_density_follows_seer_attention_nz_ratio():
    """k = max(1, int((1 - sqrt(1 - r)) nB)): with a fixed k per row the causal block triangle's density is about r."""
    assert [sparse_select.density_k(n, 0.75) for n in (1, 4, 10, 64)] == [1, 2, 5, 32]
    nb = 64
    k = sparse_select.density_k(nb, 0.5)
    read = sum(min(k, i + 1) for i in range(nb))
    assert abs(read / (nb * (nb + 1) / 2) - 0.5) < 0.03


def run_pieces(layer, x, pieces):
    """(parallel output, prefill outputs over the pieces, their end positions, the state after them, the state after
    token-by-token decoding, the token-by-token outputs)."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def run(params, x):
        mixer = nnx.merge(graphdef, params, rest, copy=True)
        state, ys = mixer.init_state(B, x.shape[1]), []
        for lo, hi in zip(pieces[:-1], pieces[1:]):
            state, y = mixer.prefill(state, x[:, lo:hi])
            ys.append(y)
        tok_state, tokens = jax.lax.scan(mixer.decode_step, mixer.init_state(B, x.shape[1]), x.swapaxes(0, 1))
        return ys, state, tok_state, tokens.swapaxes(0, 1)

    return run(params, x)


def test_decoding_equals_the_parallel_form_of_each_prefix():
    """A call whose last token is at e gives, at each of its tokens, the parallel form over x[:e + 1]; token by
    token, the tokens that end a block give the whole sequence's parallel form; pieces and steps leave one state."""
    layer = SparseAttention(D, TOPK, rngs=nnx.Rngs(0))
    T, pieces = 20, (0, 7, 20)  # the first piece ends inside a block
    x = make_x(T)
    ys, state, tok_state, tokens = run_pieces(layer, x, pieces)
    parallel = jax.jit(layer)
    for lo, hi, y in zip(pieces[:-1], pieces[1:], ys):
        assert_close(f"piece [{lo}, {hi})", y, parallel(x[:, :hi])[:, lo:hi], 1e-5)
    y_full = parallel(x)
    ends = np.arange(TOPK.block_size - 1, T, TOPK.block_size)
    assert_close("block ends, token by token", tokens[:, ends], y_full[:, ends], 1e-5)
    assert float(jnp.max(jnp.abs(tokens - y_full))) > 1e-4  # the documented difference exists at this config
    for i, (u, w) in enumerate(zip(jax.tree.leaves(state), jax.tree.leaves(tok_state))):
        assert_close(f"state leaf {i}", u, w, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [TOPK, dataclasses.replace(TOPK, density=0.4, block_size=3, sink_blocks=0)],
                         ids=["top_k", "density"])
def test_token_by_token_decoding_is_the_parallel_form_of_every_prefix(cfg):
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    T = 17
    x = make_x(T, seed=1)
    tokens = run_pieces(layer, x, (0, T))[3]
    for p in range(T):
        assert_close(f"token {p}", tokens[:, p], jax.jit(layer)(x[:, :p + 1])[:, p], 1e-5)


def test_top_k_covering_every_block_is_the_attention_layer():
    cfg = dataclasses.replace(TOPK, top_k=6)  # 6 blocks >= ceil(21 / 4)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    dense = Attention(D, cfg.attention_config(), rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(layer, nnx.Param))
    x = make_x(21)
    assert_close("top_k >= blocks", jax.jit(layer)(x), jax.jit(dense)(x), 1e-5)


def test_state_size_counts_the_policy_state():
    layer = SparseAttention(D, TOPK, rngs=nnx.Rngs(0))
    state = jax.eval_shape(lambda: layer.init_state(1, 40))
    assert layer.state_size(40) == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)) - 4  # less pos
    assert layer.state_size(200) == 2 * layer.state_size(100)


@pytest.mark.parametrize("override, message", [
    ("top_k=0", "sparse_attention.top_k must be positive"),
    ("density=1.5", "sparse_attention.density must be in (0, 1]"),
    ("sink_blocks=-1", "sparse_attention.sink_blocks must be >= 0"),
    ("score_reduce=sum", "score_reduce: expected one of ['max', 'mean']"),
])
def test_bad_fields_fail_in_one_line(override, message):
    from effarch.train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config([], ["model.sparse_attention.pattern=mean_topk", f"model.sparse_attention.{override}"])
    assert message in str(e.value) and "\n" not in str(e.value)
