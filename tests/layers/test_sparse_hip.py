"""hip (layers/sparse_hip.py): HiP's hierarchical search picks, on a hand-made case, the blocks the halving reaches
(and misses a key the pruning hides); its lists equal a literal reading of the rule, stay causal, unique and within
bounds; the parallel form is attention over them; a k covering every block is the attention layer; decoding equals
the parallel form of each prefix (the documented difference from the whole sequence's); the selection holds no
[T, T] buffer; bad fields fail in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers import sparse_select
from effarch.layers.attention import Attention
from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from effarch.layers.sparse_hip import HipPolicy
from tests.conformance import test_mixers as conformance
from tests.helpers.numerics import assert_close
from tests.layers.test_sparse_attention import dense_masked
from tests.layers.test_sparse_topk import run_pieces

B, D = 2, 24
HIP = dataclasses.replace(  # blocks of 2, top 4, 1 sink, lists shared by a block's queries (the default)
    conformance.VARIANTS["sparse_attention[hip]"].configs["sparse_attention"], hip_query_block=None)


def make_x(t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D)), jnp.float32)


def policy(cfg) -> HipPolicy:
    return HipPolicy(cfg, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads or cfg.n_heads, head_dim=cfg.head_dim,
                     rngs=nnx.Rngs(0))


def brute_force_blocks(cfg, q, k) -> list:
    """chosen[b][g][r] = set of key blocks, the rule read literally: per KV head g and query row r (in key block I),
    the candidates [s, I) cut into m branches, each halved (a one-block branch kept whole) and scored by the max over
    the row's queries and g's query heads of q · k[representative], the m best kept, until every branch is one
    block."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    T, Hq, Hkv, bs = q.shape[1], q.shape[2], k.shape[2], cfg.block_size
    bq = cfg.hip_query_block or bs
    nb = -(-T // bs)
    n_keep = cfg.top_k if cfg.density is None else sparse_select.density_k(nb, cfg.density)
    chosen = [[[] for _ in range(Hkv)] for _ in range(q.shape[0])]
    for b in range(q.shape[0]):
        for g in range(Hkv):
            heads = range(g * (Hq // Hkv), (g + 1) * (Hq // Hkv))
            for r in range(-(-T // bq)):
                i = r * bq // bs  # the row's key block
                s = min(cfg.sink_blocks, i)
                n = i - s
                m = min(max(n_keep - 1 - s, 0), n)
                branches = [(s + j * n // m, s + (j + 1) * n // m) for j in range(m)]

                def score(lo, hi):
                    rep = (lo + hi) * bs // 2 if cfg.hip_representative == "center" else lo * bs
                    return max(q[b, t, h] @ k[b, rep, g] for t in range(r * bq, min((r + 1) * bq, T)) for h in heads)

                while any(hi - lo > 1 for lo, hi in branches):
                    halves = []
                    for lo, hi in branches:
                        mid = lo + (hi - lo + 1) // 2
                        halves += [(lo, mid), (mid, hi)] if hi - lo > 1 else [(lo, hi)]
                    branches = sorted(halves, key=lambda h: -score(*h))[:m]
                chosen[b][g].append({i} | set(range(s)) | {lo for lo, _ in branches})
    return chosen


def visible_from(chosen, cfg, T, n_heads) -> np.ndarray:
    """[B, Hq, T, T] token visibility of block sets (causal inside)."""
    bs, Hkv = cfg.block_size, len(chosen[0])
    bq = cfg.hip_query_block or bs
    vis = np.zeros((len(chosen), n_heads, T, T), bool)
    for b, g in np.ndindex(len(chosen), Hkv):
        heads = list(range(g * (n_heads // Hkv), (g + 1) * (n_heads // Hkv)))
        for r, blocks in enumerate(chosen[b][g]):
            for j in blocks:
                vis[b, heads, r * bq:(r + 1) * bq, j * bs:(j + 1) * bs] = True
    return vis & np.tril(np.ones((T, T), bool))


def test_hand_checkable_search():
    """One head, head dim 1, every query 1, so a key's score is its value. Blocks of one token, T = 9, top_k 3: row 8
    keeps m = 2 of the candidates 0..7. Branches [0, 4), [4, 8); halves [0, 2) [2, 4) [4, 6) [6, 8) score their
    centres k1 = 5, k3 = 1, k5 = 2, k7 = 9: keep [6, 8), [0, 2); halves [6] [7] [0] [1] score 0, 9, 0, 5: keep 7 and 1.
    Key 4 (score 8, the second best) is never reached: its half [4, 6) was judged by k5 = 2. With `first`, the halves
    are judged by k0, k2, k4, k6 = 0, 0, 8, 0: keep [4, 6), then [0, 2) (the earlier of the tied halves); then 4 and
    one of [5] [0] [1] by 2, 0, 5: block 1."""
    keys = np.array([0, 5, 0, 1, 8, 2, 0, 9, 3], np.float32)
    k = jnp.asarray(keys)[None, :, None, None]
    q = jnp.ones((1, 9, 1, 1), jnp.float32)
    cfgs = [SparseAttentionConfig(pattern="hip", block_size=1, top_k=3, n_heads=1, head_dim=1,
                                  hip_representative=representative) for representative in ("center", "first")]
    # Blocks of 2 tokens (T = 8, 4 blocks, top_k 2): row 3 keeps one of blocks 0..2 from the branch [0, 3): halves
    # [0, 2) (centre token 2) and [2, 3) (centre token 5); then [0, 1) (token 1) or [1, 2) (token 3).
    cfg2 = SparseAttentionConfig(pattern="hip", block_size=2, top_k=2, n_heads=1, head_dim=1)
    keys2 = jnp.asarray([0, 1, 4, 9, 0, 3, 0, 0], jnp.float32)  # token 2 (4) beats 5 (3); then 3 (9) beats 1 (1)

    @jax.jit
    def select_all(q, k, q2, k2):
        return [policy(c).select(q, k) for c in cfgs] + [policy(cfg2).select(q2, k2)]

    lists = [[np.asarray(a) for a in r] for r in select_all(q, k, jnp.ones((1, 8, 1, 1)), keys2[None, :, None, None])]
    for cfg, (idx, cnt), expected in zip(cfgs, lists, ({8, 7, 1}, {8, 4, 1})):
        assert int(cnt[0, 0, 8]) == 3 and set(idx[0, 0, 8, :3]) == expected, cfg.hip_representative
        assert idx[0, 0, 8, 0] == 8  # the diagonal first
        assert brute_force_blocks(cfg, q, k)[0][0][8] == expected
    idx, cnt = lists[2]
    assert int(cnt[0, 0, 3]) == 2 and set(idx[0, 0, 3, :2]) == {3, 1}


@pytest.mark.parametrize("cfg, t", [
    (HIP, 21),
    pytest.param(dataclasses.replace(HIP, block_size=4, hip_query_block=2, top_k=3), 22, marks=pytest.mark.slow),
    pytest.param(dataclasses.replace(HIP, density=0.5, sink_blocks=0, block_size=3, hip_representative="first"), 31,
                 marks=pytest.mark.slow),
    pytest.param(dataclasses.replace(HIP, top_k=3, sink_blocks=2, block_size=1, n_kv_heads=1), 19,
                 marks=pytest.mark.slow),
], ids=["top_k_sink_gqa", "query_rows_of_2", "density_first", "token_blocks_mqa"])
def test_parallel_form_is_attention_over_the_brute_force_selection(cfg, t):
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x(t)
    q, k, _ = layer.project_qkv(x, jnp.arange(t))
    chosen = brute_force_blocks(cfg, q, k)
    idx, cnt = (np.asarray(a) for a in jax.jit(layer.policy.select)(q, k))
    for b, g, i in np.ndindex(*cnt.shape):
        assert set(idx[b, g, i, :cnt[b, g, i]]) == chosen[b][g][i], (b, g, i)
    vis = visible_from(chosen, cfg, t, layer.config.n_heads)
    y, expected = jax.jit(lambda x: (layer(x), jax.vmap(lambda xb, vb: dense_masked(layer, xb[None], vb)[0])(
        x, jnp.asarray(vis))))(x)
    assert_close("hip", y, expected, 1e-5)


@pytest.mark.parametrize("t, bs, top_k, sinks, density", [
    (50, 2, 5, 2, None), (96, 4, 3, 1, 0.3),
    pytest.param(64, 4, 1, 0, None, marks=pytest.mark.slow), pytest.param(37, 3, 3, 5, None, marks=pytest.mark.slow)])
def test_lists_are_causal_unique_within_bounds(t, bs, top_k, sinks, density):
    cfg = SparseAttentionConfig(pattern="hip", block_size=bs, top_k=top_k, sink_blocks=sinks, density=density,
                                n_heads=4, n_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.standard_normal((2, t, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, 2, 8)), jnp.float32)
    idx, cnt = (np.asarray(a) for a in jax.jit(policy(cfg).select)(q, k))
    nb = -(-t // bs)
    k_row = top_k if density is None else sparse_select.density_k(nb, density)
    assert idx.shape[:3] == (2, 2, nb) and idx.shape[3] <= max(k_row, 1 + sinks)
    for b, g, i in np.ndindex(2, 2, nb):
        listed = idx[b, g, i, :cnt[b, g, i]]
        forced = {i} | set(range(min(sinks, i)))
        assert cnt[b, g, i] == min(max(k_row, len(forced)), i + 1)
        assert len(set(listed)) == len(listed) and (listed >= 0).all() and (listed <= i).all()
        assert set(listed) >= forced and listed[0] == i


def test_top_k_covering_every_block_is_the_attention_layer():
    cfg = dataclasses.replace(HIP, top_k=11)  # 11 blocks >= ceil(21 / 2)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    dense = Attention(D, cfg.attention_config(), rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(layer, nnx.Param))
    x = make_x(21)
    assert_close("top_k >= blocks", jax.jit(layer)(x), jax.jit(dense)(x), 1e-5)
    assert_close("density 1", jax.jit(SparseAttention(D, dataclasses.replace(HIP, density=1.0), rngs=nnx.Rngs(0)))(x),
                 jax.jit(dense)(x), 1e-5)


@pytest.mark.slow  # ~4 s; the conformance variant sparse_attention[hip] decodes exactly (hip_query_block 1)
def test_decoding_equals_the_parallel_form_of_each_prefix():
    """A call whose last token is at e gives, at each of its tokens, the parallel form over x[:e + 1]; token by
    token, the tokens that end a block give the whole sequence's parallel form; pieces and steps leave one state."""
    cfg = dataclasses.replace(HIP, block_size=3)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    T, pieces = 20, (0, 7, 20)  # the first piece ends inside a block
    x = make_x(T)
    ys, state, tok_state, tokens = run_pieces(layer, x, pieces)
    parallel = jax.jit(layer)
    for lo, hi, y in zip(pieces[:-1], pieces[1:], ys):
        assert_close(f"piece [{lo}, {hi})", y, parallel(x[:, :hi])[:, lo:hi], 1e-5)
    y_full = parallel(x)
    ends = np.arange(cfg.block_size - 1, T, cfg.block_size)
    assert_close("block ends, token by token", tokens[:, ends], y_full[:, ends], 1e-5)
    assert float(jnp.max(jnp.abs(tokens - y_full))) > 1e-4  # the documented difference exists at this config
    for i, (u, w) in enumerate(zip(jax.tree.leaves(state), jax.tree.leaves(tok_state))):
        assert_close(f"state leaf {i}", u, w, 1e-5)


@pytest.mark.slow
def test_a_list_per_token_is_causal_and_decodes_exactly():
    """hip_query_block = 1: every token chooses with its own query only, so changing token t leaves the outputs before
    t as they were, and decoding (pieces, token by token) equals the whole sequence's parallel form everywhere (the
    conformance suite's sparse_attention[hip] checks the same, fast)."""
    cfg = dataclasses.replace(HIP, block_size=3, hip_query_block=1)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    T, t0 = 20, 11
    x = make_x(T)
    x_changed = x.at[:, t0].set(make_x(T, seed=9)[:, t0])
    ys, _, _, tokens = run_pieces(layer, x, (0, 7, T))
    y, y_changed = jnp.split(jax.jit(layer)(jnp.concatenate([x, x_changed])), 2)
    assert_close("outputs before the changed token", y_changed[:, :t0], y[:, :t0], 1e-6)
    assert float(jnp.max(jnp.abs(y_changed[:, t0:] - y[:, t0:]))) > 1e-3
    assert_close("prefill pieces", jnp.concatenate(ys, axis=1), y, 1e-5)
    assert_close("token by token", tokens, y, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [HIP, dataclasses.replace(HIP, density=0.4, block_size=3, sink_blocks=0,
                                                          hip_representative="first")], ids=["top_k", "density"])
def test_token_by_token_decoding_is_the_parallel_form_of_every_prefix(cfg):
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    T = 17
    x = make_x(T, seed=1)
    tokens = run_pieces(layer, x, (0, 5, 6, 13, T))[3]
    for p in range(T):
        assert_close(f"token {p}", tokens[:, p], jax.jit(layer)(x[:, :p + 1])[:, p], 1e-5)


def test_state_size_and_no_parameters():
    """The policy state is one block of queries (constant); the layer's parameters are Attention's, whatever the
    seed of the rngs (nothing seeded in the policy), so a converted attention run needs nothing new."""
    layer = SparseAttention(D, HIP, rngs=nnx.Rngs(0))
    state = jax.eval_shape(lambda: layer.init_state(1, 40))
    assert layer.state_size(40) == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)) - 4  # less pos
    assert layer.policy.state_size(10) == layer.policy.state_size(1000) == 2 * 4 * 6 * 4
    assert not jax.tree.leaves(nnx.state(layer.policy))
    dense = Attention(D, HIP.attention_config(), rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(layer, nnx.Param)) == jax.tree.structure(nnx.state(dense, nnx.Param))


def test_selection_has_no_quadratic_buffer():
    """T = 1024, blocks of 4 (256 blocks), top 4: no intermediate of the selection has T² (or nB²) elements."""
    cfg = SparseAttentionConfig(pattern="hip", block_size=4, top_k=4, n_heads=2, n_kv_heads=1, head_dim=8)
    T = 1024
    q = jax.ShapeDtypeStruct((1, T, 2, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((1, T, 1, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(policy(cfg).select)(q, k)
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert max(sizes) < (T // 4) ** 2, max(sizes)


@pytest.mark.parametrize("override, message", [
    ("hip_representative=last", "hip_representative: expected one of ['center', 'first']"),
    ("top_k=0", "sparse_attention.top_k must be positive"),
    ("density=0", "sparse_attention.density must be in (0, 1]"),
    ("hip_query_block=3", "sparse_attention.hip_query_block=3 must be a positive divisor of block_size=64"),
    ("hip_query_block=0", "sparse_attention.hip_query_block=0 must be a positive divisor"),
])
def test_bad_fields_fail_in_one_line(override, message):
    from effarch.train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config([], ["model.sparse_attention.pattern=hip", f"model.sparse_attention.{override}"])
    assert message in str(e.value) and "\n" not in str(e.value)
