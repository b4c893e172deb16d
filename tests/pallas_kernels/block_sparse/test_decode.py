"""sparse_decode_attention: the oracle against a brute-force loop and a hand computation, the xla path (values and
gradients) against the oracle, empty selections, the LSE merge, and that the xla path reads only the listed entries."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.attention import attention_reference
from effarch.pallas_kernels.block_sparse import merge_attention, sparse_decode_attention

ATOL, RTOL = 1e-5, 1e-4


def random_selection(rng, B, Hs, n, K):
    """Unsorted, duplicate-free lists padded with -1, random counts including 0 and K."""
    idx = np.full((B, Hs, K), -1, np.int32)
    cnt = rng.integers(0, K + 1, size=(B, Hs)).astype(np.int32)
    cnt.flat[0], cnt.flat[-1] = 0, K
    for b, g in itertools.product(range(B), range(Hs)):
        idx[b, g, : cnt[b, g]] = rng.permutation(n)[: cnt[b, g]]
    return idx, cnt


def brute_force(q, k, v, idx, cnt, *, unit, lengths, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Hq, _ = q.shape
    S, Hkv = k.shape[1:3]
    Hs = idx.shape[1]
    o, lse = np.zeros((B, Hq, v.shape[-1])), np.full((B, Hq), -np.inf)
    for b, h in itertools.product(range(B), range(Hq)):
        g = 0 if Hs == 1 else (h // (Hq // Hkv) if Hs == Hkv else h)
        js = sorted(j for J in idx[b, g, : cnt[b, g]] for j in range(J * unit, J * unit + unit)
                    if j < min(S, lengths[b]))
        if js:
            s = np.array([scale * q[b, h] @ k[b, j, h // (Hq // Hkv)] for j in js])
            lse[b, h] = np.log(np.sum(np.exp(s - s.max()))) + s.max()
            o[b, h] = np.exp(s - lse[b, h]) @ v[b, js, h // (Hq // Hkv)]
    return o, lse


def make(rng, B=2, S=13, Hq=4, Hkv=2, D=5, Dv=3):
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, Dv)), jnp.float32)
    return q, k, v


CASES = [(g, hs) for g in ("token", "block") for hs in ("one", "kv", "q")]


@pytest.mark.parametrize("granularity,hs", CASES)
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_matches_brute_force(granularity, hs, implementation):
    rng = np.random.default_rng(1)
    B, S, Hq, Hkv = 3, 13, 4, 2
    q, k, v = make(rng, B, S, Hq, Hkv)
    block = 4 if granularity == "block" else None
    unit = block or 1
    n = -(-S // unit)  # the last block is partial (13 = 3 * 4 + 1)
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[hs]
    idx, cnt = random_selection(rng, B, Hs, n, K=3)
    lengths = np.array([S, 9, 1], np.int32)  # 9: inside a block; entries at or past the length are masked
    o, lse = sparse_decode_attention(q, k, v, idx, cnt, granularity=granularity, block=block, lengths=lengths,
                                     scale=0.7, implementation=implementation)
    o_bf, lse_bf = brute_force(q, k, v, idx, cnt, unit=unit, lengths=lengths, scale=0.7)
    np.testing.assert_allclose(o, o_bf, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(lse, lse_bf, atol=ATOL, rtol=RTOL)


# Two fast cases by default (per-query-head token lists, per-group blocks); every case and the oracle in the slow suite.
FAST_KEY_SHIFT = (("token", "q", "xla"), ("block", "kv", "xla"))
KEY_SHIFT_CASES = [pytest.param(g, hs, impl, marks=() if (g, hs, impl) in FAST_KEY_SHIFT else pytest.mark.slow)
                   for g, hs in CASES for impl in ("reference", "xla")]


@pytest.mark.parametrize("granularity,hs,implementation", KEY_SHIFT_CASES)
def test_key_shift_equals_rope_recomputed_at_the_new_positions(granularity, hs, implementation):
    # The cache holds keys rotated at their true positions; key_shift re-rotates the keys a list entry reads by its
    # shift. Expected: RoPE applied afresh to the pre-RoPE keys at position + shift (layers/rope.py).
    from effarch.layers.rope import apply_rope, rope_frequencies

    rng = np.random.default_rng(3)
    B, S, Hq, Hkv, D = 2, 13, 4, 2, 6
    q, k0, v = make(rng, B, S, Hq, Hkv, D=D)
    freqs = rope_frequencies(D)
    k_cache = apply_rope(k0, jnp.arange(S), freqs=freqs)
    block = 4 if granularity == "block" else None
    unit = block or 1
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[hs]
    idx, cnt = random_selection(rng, B, Hs, -(-S // unit), K=3)
    shift = rng.integers(-40, 40, size=idx.shape).astype(np.int32)
    lengths = np.array([S, 9], np.int32)
    o, lse = sparse_decode_attention(q, k_cache, v, idx, cnt, granularity=granularity, block=block, lengths=lengths,
                                     key_shift=shift, rope_freqs=freqs, implementation=implementation)
    reads = {}  # (b, h) -> [(position, kv head, new position)]
    for b, h in itertools.product(range(B), range(Hq)):
        g = 0 if Hs == 1 else (h // (Hq // Hkv) if Hs == Hkv else h)
        reads[b, h] = [(j, h // (Hq // Hkv), j + shift[b, g, c]) for c in range(cnt[b, g])
                       for j in range(idx[b, g, c] * unit, idx[b, g, c] * unit + unit) if j < lengths[b]]
    flat = [(b, *r) for (b, _), rs in reads.items() for r in rs]
    k0_np = np.asarray(k0)
    fresh = np.asarray(apply_rope(jnp.asarray(np.stack([k0_np[b, j, g] for b, j, g, _ in flat]))[None, :, None],
                                  jnp.asarray([p for *_, p in flat]), freqs=freqs))[0, :, 0]
    at = 0
    for (b, h), rs in reads.items():
        if not rs:
            assert float(lse[b, h]) == -np.inf
            continue
        s = fresh[at : at + len(rs)].astype(np.float64) @ np.asarray(q[b, h], np.float64) * D**-0.5
        w = np.exp(s - s.max())
        np.testing.assert_allclose(lse[b, h], np.log(w.sum()) + s.max(), atol=ATOL, rtol=RTOL)
        vals = np.stack([np.asarray(v[b, j, g]) for j, g, _ in rs])
        np.testing.assert_allclose(o[b, h], (w / w.sum()) @ vals, atol=ATOL, rtol=RTOL)
        at += len(rs)
    with pytest.raises(ValueError, match="key_shift needs rope_freqs"):
        sparse_decode_attention(q, k_cache, v, idx, cnt, granularity=granularity, block=block, key_shift=shift)


def test_hand_computation_token_and_block():
    # One head, D = 1, keys 0..5 = [0, 1, 2, 3, 4, 5], values = 10 * key, q = 1, scale 1.
    k = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1)
    v = 10 * k
    q = jnp.ones((1, 1, 1), jnp.float32)
    for impl in ("reference", "xla"):
        @jax.jit
        def run(q, k, v, impl=impl):
            op = functools.partial(sparse_decode_attention, q, k, v, scale=1.0, implementation=impl)
            # blocks of 4: block 1 = tokens {4, 5}; length 5 hides token 5
            return (op(jnp.array([[[4, 1, 0]]]), jnp.array([[2]])),
                    op(jnp.array([[[1]]]), jnp.array([[1]]), granularity="block", block=4, lengths=jnp.array([5])))

        (o, lse), (o_blk, lse_blk) = run(q, k, v)
        # tokens {1, 4}: softmax(1, 4) = (e, e^4) / (e + e^4); o = 10 (e + 4 e^4) / (e + e^4)
        e1, e4 = np.exp(1.0), np.exp(4.0)
        np.testing.assert_allclose(o[0, 0, 0], 10 * (e1 + 4 * e4) / (e1 + e4), rtol=1e-6)
        np.testing.assert_allclose(lse[0, 0], np.log(e1 + e4), rtol=1e-6)
        np.testing.assert_allclose(o_blk[0, 0, 0], 40.0, rtol=1e-6)  # exactly token 4
        np.testing.assert_allclose(lse_blk[0, 0], 4.0, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_full_selection_equals_dense_attention(granularity):
    rng = np.random.default_rng(2)
    B, S, Hq, Hkv = 2, 11, 6, 2
    q, k, v = make(rng, B, S, Hq, Hkv)
    block = 3 if granularity == "block" else None
    n = -(-S // (block or 1))
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[::-1], (B, Hkv, n))
    o = sparse_decode_attention(q, k, v, idx, jnp.full((B, Hkv), n), granularity=granularity, block=block,
                                return_lse=False)
    dense = attention_reference(q[:, None], k, v, causal=False)[:, 0]
    np.testing.assert_allclose(o, dense, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("granularity,hs", CASES)
def test_xla_gradients_match_reference(granularity, hs):
    rng = np.random.default_rng(3)
    B, S, Hq, Hkv = 2, 10, 6, 3
    q, k, v = make(rng, B, S, Hq, Hkv, D=4, Dv=5)
    block = 3 if granularity == "block" else None
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[hs]
    idx, cnt = random_selection(rng, B, Hs, -(-S // (block or 1)), K=3)
    lengths = jnp.array([7, S])
    w_o = jnp.asarray(rng.standard_normal((B, Hq, 5)), jnp.float32)
    w_l = jnp.asarray(rng.standard_normal((B, Hq)), jnp.float32)

    def loss(impl, q, k, v):
        o, lse = sparse_decode_attention(q, k, v, idx, cnt, granularity=granularity, block=block, lengths=lengths,
                                         implementation=impl)
        return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l)

    g_ref = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_xla, g_ref, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_empty_selection_gives_zero_and_merges(implementation):
    rng = np.random.default_rng(4)
    q, k, v = make(rng, B=2, S=8, Hq=2, Hkv=2)
    none = (jnp.full((2, 1, 2), -1), jnp.zeros((2, 1), jnp.int32))
    a = (jnp.array([[[0, 3, 5]], [[1, 2, 7]]]), jnp.full((2, 1), 3))
    b = (jnp.array([[[1, 2, 4, 6, 7]], [[0, 3, 4, 5, 6]]]), jnp.full((2, 1), 5))
    past = (jnp.array([[[5, 6]], [[7, 4]]]), jnp.full((2, 1), 2))  # all at or past the lengths: empty too

    @jax.jit
    def run(q, k, v):
        op = functools.partial(sparse_decode_attention, q, k, v, implementation=implementation)
        o0, l0 = op(*none)
        o1, l1 = op(*past, lengths=jnp.array([5, 3]))
        oa, la = op(*a)
        ob, lb = op(*b)
        grads = jax.grad(lambda q, k, v: jnp.sum(sparse_decode_attention(q, k, v, *none,
                                                                         implementation=implementation)[0]),
                         argnums=(0, 1, 2))(q, k, v)
        return o0, l0, o1, l1, oa, la, merge_attention(oa, la, o0, l0), merge_attention(oa, la, ob, lb), grads

    o0, l0, o1, l1, oa, la, (om0, lm0), (om, lm), grads = run(q, k, v)
    for o, lse in ((o0, l0), (o1, l1)):
        assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(lse))
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    # merge_attention: an empty part leaves the other unchanged; two disjoint halves give the union.
    np.testing.assert_allclose(om0, oa, atol=ATOL)
    np.testing.assert_allclose(lm0, la, atol=ATOL)
    np.testing.assert_allclose(om, attention_reference(q[:, None], k, v, causal=False)[:, 0], atol=ATOL, rtol=RTOL)


def _cache_reads(fn, q, k, v):
    """The equations of fn's jaxpr that read the k or v cache argument, as (primitive, output shapes)."""
    jaxpr = jax.make_jaxpr(fn)(q, k, v).jaxpr
    caches = {id(x) for x in jaxpr.invars[1:3]}
    return [(e.primitive.name, [tuple(o.aval.shape) for o in e.outvars])
            for e in jaxpr.eqns if any(id(x) in caches for x in e.invars)]


@pytest.mark.parametrize("granularity,hs", CASES)
def test_xla_reads_only_the_selected_entries(granularity, hs):
    B, S, Hq, Hkv, D, K = 2, 4096, 4, 2, 8, 6
    q = jnp.zeros((B, Hq, D))
    k = v = jnp.zeros((B, S, Hkv, D), jnp.bfloat16)
    block = 16 if granularity == "block" else None
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[hs]
    idx, cnt = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, Hs, K)), jnp.full((B, Hs), K)

    def fn(q, k, v):
        return sparse_decode_attention(q, k, v, idx, cnt, granularity=granularity, block=block,
                                       lengths=jnp.array([S, 100]), implementation="xla")

    reads = _cache_reads(fn, q, k, v)
    N = K * (block or 1)
    gs = Hq // Hkv if Hs == Hq else 1
    # Exactly one gather per cache, each returning the listed entries [B, Hkv, Gs, N, D]: O(K), never O(S).
    assert reads == [("gather", [(B, Hkv, gs, N, D)])] * 2
    assert B * Hkv * gs * N * D <= k.size // 10


def test_bad_inputs_name_the_argument():
    q, k, v = make(np.random.default_rng(5), B=1, S=8, Hq=2, Hkv=2)
    one = jnp.ones((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="outside"):
        sparse_decode_attention(q, k, v, jnp.array([[[8]]]), one)
    with pytest.raises(ValueError, match="outside"):
        sparse_decode_attention(q, k, v, jnp.array([[[2]]]), one, granularity="block", block=4)
    with pytest.raises(ValueError, match="twice"):
        sparse_decode_attention(q, k, v, jnp.array([[[3, 3]]]), jnp.full((1, 1), 2))
    with pytest.raises(ValueError, match="list groups"):
        sparse_decode_attention(q, k, v, jnp.zeros((1, 3, 1), jnp.int32), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="block >= 1"):
        sparse_decode_attention(q, k, v, jnp.zeros((1, 1, 1), jnp.int32), one, granularity="block")
    with pytest.raises(ValueError, match="granularity"):
        sparse_decode_attention(q, k, v, jnp.zeros((1, 1, 1), jnp.int32), one, granularity="page")
    with pytest.raises(ValueError, match="lengths"):
        sparse_decode_attention(q, k, v, jnp.zeros((1, 1, 1), jnp.int32), one, lengths=jnp.array([3, 4]))
    # Traced lists cannot be checked: out-of-range ids are ignored, as in the oracle.
    o = jax.jit(lambda i: sparse_decode_attention(q, k, v, i, one, return_lse=False))(jnp.array([[[99]]]))
    assert np.all(np.asarray(o) == 0)
