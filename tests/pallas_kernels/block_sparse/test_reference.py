"""The block-sparse oracle against a brute-force loop over (b, h, i, j), and merge_attention's exactness."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.attention import attention_reference
from effarch.pallas_kernels.block_sparse import block_sparse_attention, block_sparse_reference, merge_attention


def random_lists(rng, B, Hs, n_q_blocks, n_kv_blocks, kmax):
    """Unsorted, duplicate-free lists padded with -1, random counts (including 0 and Kmax)."""
    idx = np.full((B, Hs, n_q_blocks, kmax), -1, np.int32)
    cnt = rng.integers(0, kmax + 1, size=(B, Hs, n_q_blocks)).astype(np.int32)
    cnt.flat[0], cnt.flat[-1] = 0, kmax
    for b, g, i in itertools.product(range(B), range(Hs), range(n_q_blocks)):
        idx[b, g, i, : cnt[b, g, i]] = rng.permutation(n_kv_blocks)[: cnt[b, g, i]]
    return idx, cnt


def brute_force(q, k, v, idx, cnt, *, q_block, kv_block, causal, window, n_sink, q_pos, kv_pos, seg, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1:3]
    Hs = idx.shape[1]
    o = np.zeros((B, Tq, Hq, v.shape[-1]))
    lse = np.full((B, Tq, Hq), -np.inf)
    for b, h, i in itertools.product(range(B), range(Hq), range(Tq)):
        g = 0 if Hs == 1 else (h // (Hq // Hkv) if Hs == Hkv else h)
        blocks = set(idx[b, g, i // q_block, : cnt[b, g, i // q_block]].tolist())
        js = []
        for j in range(Tk):
            ok = j // kv_block in blocks and q_pos[b, i] >= 0 and kv_pos[b, j] >= 0
            ok &= not causal or kv_pos[b, j] <= q_pos[b, i]
            if window is not None:
                ok &= q_pos[b, i] - kv_pos[b, j] < window[g] or kv_pos[b, j] < n_sink[g]
            if seg is not None:
                ok &= seg[0][b, i] == seg[1][b, j]
            if ok:
                js.append(j)
        if js:
            s = np.array([scale * q[b, i, h] @ k[b, j, h // (Hq // Hkv)] for j in js])
            lse[b, i, h] = np.log(np.sum(np.exp(s - s.max()))) + s.max()
            p = np.exp(s - lse[b, i, h])
            o[b, i, h] = p @ v[b, js, h // (Hq // Hkv)]
    return o, lse


@pytest.mark.parametrize("Hs_kind", ["one", "kv", "q"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_brute_force(Hs_kind, causal):
    rng = np.random.default_rng(0)
    B, Tq, Tk, Hq, Hkv, D, Dv = 2, 11, 13, 4, 2, 5, 3
    q_block, kv_block = 3, 4
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[Hs_kind]
    nq, nk = -(-Tq // q_block), -(-Tk // kv_block)
    idx, cnt = random_lists(rng, B, Hs, nq, nk, kmax=3)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, Tq, Hq, D), (B, Tk, Hkv, D),
                                                                         (B, Tk, Hkv, Dv)))
    # Permuted positions with padding (-1), per-group windows and sinks, segments.
    q_pos = np.stack([rng.permutation(Tq) for _ in range(B)]).astype(np.int32)
    kv_pos = np.stack([rng.permutation(Tk) for _ in range(B)]).astype(np.int32)
    q_pos[0, 2] = kv_pos[1, 5] = -1
    window = rng.integers(2, 9, size=Hs).astype(np.int32)
    n_sink = rng.integers(0, 3, size=Hs).astype(np.int32)
    seg = (rng.integers(0, 2, size=(B, Tq)), rng.integers(0, 2, size=(B, Tk)))
    kw = dict(q_block=q_block, kv_block=kv_block, causal=causal, window=window, n_sink=n_sink, q_pos=q_pos,
              kv_pos=kv_pos, scale=0.7)
    o, lse = block_sparse_reference(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), segment_ids=seg, return_lse=True,
                                    **kw)
    o_bf, lse_bf = brute_force(q, k, v, idx, cnt, seg=seg, **kw)
    assert np.isneginf(lse_bf).any() and np.isfinite(lse_bf).any()  # the case covers empty and non-empty rows
    np.testing.assert_allclose(o, o_bf, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_bf))
    np.testing.assert_allclose(np.where(np.isfinite(lse_bf), lse, 0), np.where(np.isfinite(lse_bf), lse_bf, 0),
                               atol=1e-5)


def test_full_lists_equal_dense_causal_attention_and_empty_rows_have_finite_grads():
    rng = np.random.default_rng(1)
    B, T, Hq, Hkv, D = 1, 10, 4, 2, 6
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32) for h in (Hq, Hkv, Hkv))
    nb = -(-T // 4)
    idx = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, 1, nb, nb))
    cnt = jnp.full((B, 1, nb), nb, jnp.int32)
    out = block_sparse_attention(q, k, v, idx, cnt, q_block=4, kv_block=4)
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), atol=1e-6)

    empty = jnp.zeros_like(cnt)

    def loss(q, k, v):
        o, lse = block_sparse_reference(q, k, v, idx, empty, q_block=4, kv_block=4, return_lse=True)
        return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    o, lse = block_sparse_reference(q, k, v, idx, empty, q_block=4, kv_block=4, return_lse=True)
    assert not np.any(o) and np.all(np.isneginf(lse))
    for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
        assert np.all(np.isfinite(g)) and not np.any(g)


def test_merge_of_disjoint_halves_is_the_union():
    rng = np.random.default_rng(2)
    B, T, H, D, nb = 2, 8, 2, 4, 4
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3))
    idx = np.stack([rng.permutation(nb) for _ in range(B * H * nb)]).reshape(B, H, nb, nb).astype(np.int32)
    split = rng.integers(0, nb + 1, size=(B, H, nb)).astype(np.int32)
    kw = dict(q_block=2, kv_block=2, causal=False, return_lse=True)
    o1, l1 = block_sparse_reference(q, k, v, jnp.asarray(idx), jnp.asarray(split), **kw)
    # The complement of each list: its last nb - split entries, reversed to the front.
    o2, l2 = block_sparse_reference(q, k, v, jnp.asarray(idx[..., ::-1]), jnp.asarray(nb - split), **kw)
    o, lse = merge_attention(o1, l1, o2, l2)
    o_full, l_full = block_sparse_reference(q, k, v, jnp.asarray(idx), jnp.full(split.shape, nb, jnp.int32), **kw)
    np.testing.assert_allclose(o, o_full, atol=1e-6)
    np.testing.assert_allclose(lse, l_full, atol=1e-6)

    ninf = jnp.full((B, T, H), -jnp.inf)
    o, lse = merge_attention(o1, ninf, o2, ninf)
    assert not np.any(o) and np.all(np.isneginf(lse))
    grads = jax.grad(lambda a, b: jnp.sum(merge_attention(a, ninf, b, ninf)[0]), argnums=(0, 1))(o1, o2)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("change, message", [
    (lambda i, c: (i, c + 5), "block_cnt must lie in"),
    (lambda i, c: (i.at[0, 0, 0, 0].set(99), c), "outside"),
    (lambda i, c: (i.at[0, 0, 0, 1].set(i[0, 0, 0, 0]), c), "twice"),
    (lambda i, c: (i[:, :, :1], c[:, :, :1]), "nQb"),
    (lambda i, c: (jnp.concatenate([i, i, i], axis=1), jnp.concatenate([c, c, c], axis=1)), "list groups"),
])
def test_bad_lists_are_one_line_errors(change, message):
    q = k = v = jnp.zeros((1, 8, 2, 4))
    idx = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (1, 1, 4, 4))
    cnt = jnp.full((1, 1, 4), 4, jnp.int32)
    idx, cnt = change(idx, cnt)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, v, idx, cnt, q_block=2, kv_block=2)
