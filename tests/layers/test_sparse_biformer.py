"""biformer (layers/sparse_biformer.py) and its equal-cost window bidir_window (layers/sparse_patterns.py): the
routing of a hand-made case, lists within bounds, the parallel form is non-causal attention over the routed regions
(and over every region when top_k covers them: the attention layer with causal false), region permutation
equivariance, gradients, LCE, and one-line errors for bad fields and for decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers import sparse_patterns
from effarch.layers.attention import Attention
from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from effarch.layers.sparse_biformer import BiFormerPolicy
from tests.conformance import test_mixers as conformance
from tests.helpers.numerics import assert_close
from tests.layers.test_sparse_attention import dense_masked

B, D = 2, 24
BIFORMER = dataclasses.replace(conformance.VARIANTS["sparse_attention[biformer]"].configs["sparse_attention"],
                               biformer_lce=0)  # blocks of 4, top 3, 4 query heads over 2 KV heads


def make_x(t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D)), jnp.float32)


def test_routing_of_a_hand_made_case():
    """Region descriptors are the block means of q and k over all channels; each query region reads its top_k
    regions by q_r · k_r, the best first, its own region not forced."""
    policy = BiFormerPolicy(SparseAttentionConfig(pattern="biformer", block_size=2, top_k=2, n_heads=1),
                            n_heads=1, n_kv_heads=1, head_dim=2, rngs=nnx.Rngs(0))
    q_r = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)  # the four regions' mean queries
    k_r = np.array([[2, 0], [0, 1], [0, 3], [1, 0.5]], np.float32)  # and mean keys
    # Each region's two tokens are its mean -/+ an offset that cancels in the mean.
    offset = np.array([[0.5, -2.0]], np.float32)
    q = np.stack([q_r - offset, q_r + offset], axis=1).reshape(1, 8, 1, 2)
    k = np.stack([k_r + offset, k_r - offset], axis=1).reshape(1, 8, 1, 2)
    idx, cnt = (np.asarray(a) for a in policy.route(jnp.asarray(q), jnp.asarray(k)))
    # q = (1, 0): affinities (2, 0, 0, 1) -> regions 0, 3; q = (0, 1): (0, 1, 3, 0.5) -> 2, 1 (region 1 itself second).
    np.testing.assert_array_equal(idx[0, 0], [[0, 3], [2, 1], [0, 3], [2, 1]])
    np.testing.assert_array_equal(cnt[0, 0], [2, 2, 2, 2])


@pytest.mark.parametrize("t, block, top_k", [(21, 4, 3), (20, 4, 9), (7, 3, 1)], ids=["partial", "k>nB", "k=1"])
def test_lists_are_unique_within_bounds_and_exactly_k_long(t, block, top_k):
    cfg = dataclasses.replace(BIFORMER, block_size=block, top_k=top_k)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    _, _, _, q_raw, k_raw = layer.project_qkv_raw(make_x(t), jnp.arange(t))
    idx, cnt = (np.asarray(a) for a in jax.jit(layer.policy.route)(q_raw, k_raw))
    nb = -(-t // block)
    assert idx.shape == (B, 1, nb, min(top_k, nb)) and (cnt == min(top_k, nb)).all()
    assert ((idx >= 0) & (idx < nb)).all()
    for row in idx.reshape(-1, idx.shape[-1]):
        assert len(set(row)) == len(row)


def brute_force_visible(layer: SparseAttention, x) -> np.ndarray:
    """visible [B, Hq, T, T] from the paper's routing read literally: per query region I, the top_k regions J by
    mean(q_raw in I) · mean(k_raw in J) over all channels (each KV head's keys against its query heads' mean)."""
    c = layer.sparse
    T = x.shape[1]
    _, _, _, q, k = (np.asarray(a, np.float64) for a in layer.project_qkv_raw(x, jnp.arange(T)))
    Hq, Hkv, bs = q.shape[2], k.shape[2], c.block_size
    nb = -(-T // bs)
    vis = np.zeros((x.shape[0], Hq, T, T), bool)
    for b in range(x.shape[0]):
        q_r = [q[b, i * bs:(i + 1) * bs].mean(0).reshape(Hkv, Hq // Hkv, -1).mean(1) for i in range(nb)]
        k_r = [k[b, j * bs:(j + 1) * bs].mean(0) for j in range(nb)]
        for i in range(nb):
            scores = [np.sum(q_r[i] * k_r[j]) for j in range(nb)]
            for j in np.argsort(scores)[::-1][:c.top_k]:
                vis[b, :, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
    return vis


def test_parallel_form_is_attention_over_the_routed_regions():
    layer = SparseAttention(D, BIFORMER, rngs=nnx.Rngs(0))
    x = make_x(21)  # 6 regions, the last one a single token
    vis = brute_force_visible(layer, x)
    assert not vis.all()  # the routing leaves regions out
    y, expected = jax.jit(lambda x: (layer(x), jax.vmap(lambda xb, vb: dense_masked(layer, xb[None], vb)[0])(
        x, jnp.asarray(vis))))(x)
    assert_close("biformer", y, expected, 1e-5)


@pytest.mark.parametrize("pattern", ["biformer", "bidir_window"])
def test_top_k_covering_every_region_is_non_causal_attention(pattern):
    """top_k >= the number of regions: the attention layer with causal false on the same weights, outputs and
    gradients (T = 18: a partial last region)."""
    cfg = dataclasses.replace(BIFORMER, pattern=pattern, top_k=5)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    dense = Attention(D, dataclasses.replace(cfg.attention_config(), causal=False), rngs=nnx.Rngs(0))
    x, ct = make_x(18), make_x(18, seed=1)

    def value_and_grads(module):
        graphdef, params = nnx.split(module, nnx.Param)
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return y, vjp(ct)

    (y, (gp, gx)), (y_ref, (gp_ref, gx_ref)) = jax.jit(lambda: (value_and_grads(layer), value_and_grads(dense)))()
    assert_close(pattern, y, y_ref, 1e-5)
    assert_close(f"{pattern} dx", gx, gx_ref, 1e-5)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert_close(f"{pattern} d{name}", gp[name]["kernel"][...], gp_ref[name]["kernel"][...], 1e-5)


def test_window_routing_is_bidir_window_plus_the_same_lce():
    """biformer_routing "window" reads the bidir_window blocks whatever the content: without LCE it is the bidir_window
    pattern on the same weights; with LCE it adds the same convolution as the content-routed layer."""
    window = SparseAttention(D, dataclasses.replace(BIFORMER, biformer_routing="window"), rngs=nnx.Rngs(0))
    static = SparseAttention(D, dataclasses.replace(BIFORMER, pattern="bidir_window"), rngs=nnx.Rngs(0))
    x = make_x(21)
    assert_close("window routing", jax.jit(lambda x: window(x))(x), jax.jit(lambda x: static(x))(x), 1e-6)
    _, _, _, q_raw, k_raw = window.project_qkv_raw(x, jnp.arange(21))
    idx, cnt = window.policy.route(q_raw, k_raw)
    expected_idx, expected_cnt = sparse_patterns.block_lists(sparse_patterns.bidir_window_blocks(6, 6, k=3))
    np.testing.assert_array_equal(np.asarray(idx)[1], expected_idx)
    np.testing.assert_array_equal(np.asarray(cnt)[0], expected_cnt)


def test_region_permutation_equivariance():
    """Without RoPE and LCE, the routing and the attention see regions only through their content: permuting the
    regions of x permutes the output's regions the same way (the spec's non-causal check for BRA)."""
    layer = SparseAttention(D, dataclasses.replace(BIFORMER, rope=False), rngs=nnx.Rngs(0))
    x = make_x(20)  # 5 whole regions of 4
    perm = np.array([3, 0, 4, 1, 2])
    x_perm = x.reshape(B, 5, 4, D)[:, perm].reshape(B, 20, D)
    y, y_perm = jax.jit(lambda a, b: (layer(a), layer(b)))(x, x_perm)
    assert_close("permuted", y_perm, y.reshape(B, 5, 4, D)[:, perm].reshape(B, 20, D), 1e-5)


def test_lce_is_a_depthwise_same_convolution_on_v_and_gradients_reach_every_parameter():
    cfg = dataclasses.replace(BIFORMER, biformer_lce=3)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x(13)
    _, _, v, _, _ = layer.project_qkv_raw(x, jnp.arange(13))
    w, bias = np.asarray(layer.policy.lce_kernel[...]), np.asarray(layer.policy.lce_bias[...])
    vf = np.asarray(v).reshape(B, 13, -1)
    vp = np.pad(vf, ((0, 0), (1, 1), (0, 0)))
    expected = sum(vp[:, i:i + 13] * w[i] for i in range(3)) + bias  # zero padding at both ends
    lce = np.asarray(layer.policy.local_context(v))  # [B, T, Hq, Dv], each KV head's channels over its group
    np.testing.assert_allclose(lce, np.repeat(expected.reshape(B, 13, 2, -1), 2, axis=2),
                               rtol=1e-5, atol=1e-6)
    grads = jax.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == 6  # q, k, v, o projections and the LCE kernel and bias
    for g in leaves:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_bidir_window_reads_exactly_k_blocks_centred_on_the_query_block():
    mask = sparse_patterns.bidir_window_blocks(6, 6, k=3)[0]
    assert (mask.sum(-1) == 3).all()
    assert [list(np.flatnonzero(r)) for r in mask] == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5],
                                                      [3, 4, 5]]
    assert [list(np.flatnonzero(r)) for r in sparse_patterns.bidir_window_blocks(5, 5, k=4)[0]][:3] == [
        [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4]]  # (k - 1) // 2 = 1 block before, 2 after, moved inward
    assert sparse_patterns.bidir_window_blocks(2, 2, k=5)[0].all()


@pytest.mark.parametrize("fields, message", [
    (dict(biformer_lce=4), "biformer_lce must be 0 (no LCE) or an odd kernel size"),
    (dict(biformer_lce=-1), "biformer_lce must be 0 (no LCE) or an odd kernel size"),
    (dict(pattern="mean_topk", biformer_lce=3), "biformer_lce applies to pattern biformer"),
    (dict(density=0.5), "pattern biformer reads exactly top_k blocks"),
    (dict(pattern="bidir_window", sink_blocks=1), "pattern bidir_window reads exactly top_k blocks"),
    (dict(infer_dense=True), "infer_dense: pattern biformer is non-causal"),
    (dict(top_k=0), "top_k must be positive"),
    (dict(pattern="bidir_window", biformer_routing="window"), "biformer_routing applies to pattern biformer"),
])
def test_bad_fields_fail_in_one_line(fields, message):
    with pytest.raises(ValueError) as e:
        SparseAttentionConfig(**{**dict(pattern="biformer"), **fields})
    assert str(e.value).startswith("sparse_attention.") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("pattern", ["biformer", "bidir_window"])
def test_decoding_a_non_causal_pattern_fails_in_one_line(pattern):
    layer = SparseAttention(D, dataclasses.replace(BIFORMER, pattern=pattern), rngs=nnx.Rngs(0))
    assert not layer.causal and SparseAttention(D, SparseAttentionConfig(), rngs=nnx.Rngs(0)).causal
    for call in (lambda: layer.init_state(1, 8), lambda: layer.state_size(8), lambda: layer.prefill({}, make_x(3)),
                 lambda: layer.decode_step({}, make_x(1)[:, 0])):
        with pytest.raises(ValueError, match=f"^sparse_attention: pattern {pattern} is non-causal; a non-causal "
                                             "mixer cannot decode"):
            call()
