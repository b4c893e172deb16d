"""Routing Transformer policy (layers/sparse_routing.py): the parallel form is softmax attention over each token's
visible set written out per query (the block_size newest tokens of its key's cluster; one cluster on local heads),
it is causal under random perturbations of the later tokens, the lists stay in bounds, the centroids' EMA is the
reference formula and happens only in training mode, gradients reach q/k/v (never the centroids), decoding over a
KV cache equals the parallel form (the conformance suite runs the layer: `sparse_attention[routing]`), the trainer
updates and checkpoints the centroids, and bad settings fail in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from effarch.layers.sparse_routing import RoutingPolicy, cluster_ranks, ema_centroids
from effarch.layers.trained_state import SAVED

B, T, HQ, HKV, K, DV = 2, 23, 4, 2, 8, 5
CFG = SparseAttentionConfig(pattern="routing", block_size=4, routing_clusters=3, routing_local_heads=1, n_heads=HQ,
                            n_kv_heads=HKV, head_dim=K)


def policy(cfg=CFG, seed=0) -> RoutingPolicy:
    return RoutingPolicy(cfg, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=K, rngs=nnx.Rngs(seed))


@nnx.jit
def attend(pol, q, k, v):  # nnx.jit carries a training-mode write of the centroids out
    return pol(q, k, v)


@nnx.jit
def clusters(pol, k):
    return pol.clusters(k)


@nnx.jit
def decode(pol, q, k_cache, v_cache, q_pos):
    return pol.decode({}, q, k_cache, v_cache, q_pos=q_pos)[1]


def qkv(seed=0, t=T):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((B, t, HQ, K), (B, t, HKV, K),
                                                                           (B, t, HKV, DV)))


def reference(q, k, v, cluster, window):
    """Per query: softmax over {j <= t : c(j) = c(t)}, the `window` newest of them, written out with numpy."""
    q, k, v, c = (np.asarray(a, np.float64) for a in (q, k, v, cluster))
    out = np.zeros((*q.shape[:3], v.shape[-1]))
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            g = h // group
            for t in range(q.shape[1]):
                keys = [j for j in range(t + 1) if c[b, j, g] == c[b, t, g]][-window:]
                s = k[b, keys, g] @ q[b, t, h] / np.sqrt(q.shape[-1])
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, g]
    return out


def test_parallel_form_is_attention_over_the_newest_keys_of_the_own_cluster():
    pol = policy()
    q, k, v = qkv()
    cluster = np.asarray(clusters(pol, k))
    assert (cluster[:, :, 1] == 0).all()  # the local head: one cluster, a sliding window
    assert len(np.unique(cluster[:, :, 0])) == 3  # the routed head uses every cluster here
    np.testing.assert_allclose(np.asarray(attend(pol, q, k, v)), reference(q, k, v, cluster, CFG.block_size), atol=2e-6)


def test_later_tokens_never_change_earlier_outputs():
    """Random perturbation test (CAB's causal-self check, per element): for several t, q/k/v after t are redrawn;
    the outputs up to t stay the same (to rounding) although the later tokens' clusters change."""
    pol = policy()
    q, k, v = qkv()
    y = np.asarray(attend(pol, q, k, v))
    rng = np.random.default_rng(7)
    for t in (0, 5, 11, 17):
        q2, k2, v2 = (a.at[:, t + 1:].set(jnp.asarray(rng.standard_normal(a[:, t + 1:].shape), jnp.float32))
                      for a in (q, k, v))
        assert (np.asarray(clusters(pol, k2))[:, t + 1:] != np.asarray(clusters(pol, k))[:, t + 1:]).any()
        y2 = np.asarray(attend(pol, q2, k2, v2))
        np.testing.assert_allclose(y2[:, : t + 1], y[:, : t + 1], atol=1e-6)
        assert np.abs(y2[:, t + 1:] - y[:, t + 1:]).max() > 1e-2


def test_lists_are_the_previous_and_own_block_in_bounds():
    for n_blocks in (1, 2, 6):
        idx, cnt = (np.asarray(a) for a in RoutingPolicy.lists(n_blocks, 3))
        assert idx.shape == (3, 1, n_blocks, 2) and cnt.shape == (3, 1, n_blocks)
        for i in range(n_blocks):
            used = idx[0, 0, i, : cnt[0, 0, i]]
            assert set(used) == ({i, i - 1} if i else {0})
            assert ((used >= 0) & (used < n_blocks)).all()


def test_ranks_count_the_earlier_tokens_of_the_same_cluster():
    c = jnp.asarray([[[0], [1], [0], [0], [2], [1]]], jnp.int32)  # [B=1, T=6, H=1]
    np.testing.assert_array_equal(np.asarray(cluster_ranks(c, 3))[0, :, 0], [0, 0, 1, 2, 0, 1])


def test_ema_update_is_the_reference_formula_and_only_in_training_mode():
    pol = policy()
    q, k, v = qkv()
    mu0 = np.asarray(pol.centroids[...])
    attend(pol, q, k, v)
    np.testing.assert_array_equal(np.asarray(pol.centroids[...]), mu0)  # eval mode (the default) reads only
    c = np.asarray(clusters(pol, k))[:, :, :1]
    k_routed = np.asarray(k, np.float64)[:, :, :1]
    k_unit = k_routed / np.linalg.norm(k_routed, axis=-1, keepdims=True)
    expected = mu0.astype(np.float64).copy()
    for h in range(mu0.shape[0]):
        for j in range(mu0.shape[1]):
            members = k_unit[:, :, h][c[:, :, h] == j]
            new = mu0[h, j] if len(members) == 0 else members.sum(0) / np.linalg.norm(members.sum(0))
            expected[h, j] = 0.999 * mu0[h, j] + 0.001 * new
    pol.train()
    assert pol.use_running_average is False
    attend(pol, q, k, v)
    np.testing.assert_allclose(np.asarray(pol.centroids[...]), expected, atol=1e-6)
    # An empty cluster keeps its centroid: every key to cluster 0 of a fresh head.
    mu = jnp.asarray(mu0)
    got = np.asarray(ema_centroids(mu, jnp.ones((1, 4, 1, K)), jnp.zeros((1, 4, 1), jnp.int32), 0.9))
    np.testing.assert_allclose(got[0, 1:], mu0[0, 1:], atol=1e-7)
    np.testing.assert_allclose(got[0, 0], 0.9 * mu0[0, 0] + 0.1 / np.sqrt(K), atol=1e-6)


def test_gradients_reach_q_k_v_and_the_commitment_loss_only_the_keys():
    pol = policy()
    q, k, v = qkv()
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, HQ, DV)), jnp.float32)
    graphdef, state = nnx.split(pol)

    def f(q, k, v, state):
        m = nnx.merge(graphdef, state, copy=True)
        return jnp.sum(m(q, k, v) * cot), m.commitment[...]

    (gq, gk, gv, gs) = jax.jit(jax.grad(lambda *a: f(*a)[0], argnums=(0, 1, 2, 3)))(q, k, v, state)
    for name, g in (("q", gq), ("k", gk), ("v", gv)):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 1e-3, name
    assert np.abs(np.asarray(gs["centroids"][...])).max() == 0  # the centroids never get a gradient
    commitment, ck = jax.jit(jax.value_and_grad(lambda k: f(q, k, v, state)[1]))(k)
    assert float(commitment) > 0
    assert np.abs(np.asarray(ck)[:, :, 0]).max() > 0 and np.abs(np.asarray(ck)[:, :, 1]).max() == 0  # routed head


def test_decode_over_a_cache_equals_the_parallel_form():
    """Chunks of the sequence decoded over a cache of S > T slots (the unwritten slots hold zeros)."""
    pol = policy()
    q, k, v = qkv()
    y = np.asarray(attend(pol, q, k, v))
    S = T + 5
    k_cache = jnp.zeros((B, S, HKV, K)).at[:, :T].set(k)
    v_cache = jnp.zeros((B, S, HKV, DV)).at[:, :T].set(v)
    for lo, hi in ((0, 8), (8, 16)):  # one compile: the positions are traced
        cut = k_cache.at[:, hi:].set(0), v_cache.at[:, hi:].set(0)  # what the cache holds after token hi - 1
        o = decode(pol, q[:, lo:hi], *cut, jnp.arange(lo, hi, dtype=jnp.int32))
        np.testing.assert_allclose(np.asarray(o), y[:, lo:hi], atol=1e-6)


def test_the_layer_trains_the_centroids_in_training_mode_only():
    layer = SparseAttention(12, dataclasses.replace(CFG, head_dim=None, n_heads=2, n_kv_heads=2,
                                                    routing_local_heads=0), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, 12)), jnp.float32)
    _, saved, _ = nnx.split(layer, SAVED, ...)
    assert "centroids" in saved["policy"]
    mu0 = np.asarray(layer.policy.centroids[...])
    assert layer.policy.use_running_average  # built in eval mode: the centroids are read only (tested above)
    layer.train()
    nnx.jit(lambda layer, x: layer(x))(layer, x)
    assert np.abs(np.asarray(layer.policy.centroids[...]) - mu0).max() > 1e-5


@pytest.mark.parametrize("override, match", [
    (dict(routing_clusters=0), "sparse_attention.routing_clusters"),
    (dict(routing_local_heads=3), "sparse_attention.routing_local_heads"),
    (dict(routing_decay=1.0), "sparse_attention.routing_decay"),
    (dict(routing_commitment=-1.0), "sparse_attention.routing_commitment"),
])
def test_bad_settings_fail_in_one_line(override, match):
    with pytest.raises(ValueError, match=match) as e:
        dataclasses.replace(CFG, **override)
    assert "\n" not in str(e.value)
