"""block_stats_attention (pallas_kernels/block_sparse/stats.py): the reference against a float64 loop over the
definition, the two-pass xla path against the reference (o, lse, block scores, gradients of o; awkward shapes,
GQA, several steps, cross lengths), the scores carry no gradient, and the xla path builds no [Tq, Tk] array and no
K/V repeated per query head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.block_sparse import block_stats_attention
from effarch.pallas_kernels.block_sparse.stats import block_stats_reference, block_stats_xla
from tests.pallas_kernels.block_sparse.test_xla import _largest_array


def _qkv(B, Tq, Tk, Hq, Hkv, D, Dv, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((B, Tq, Hq, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, Tk, Hkv, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, Tk, Hkv, Dv)), jnp.float32))


def test_reference_is_the_definition():
    """float64 loops: P_ij = softmax over j <= i; block_scores[I, J] = max of P over the tile's visible pairs, 0 on
    tiles with none; rows normalised by their sum give a distribution (the gate's target)."""
    B, T, Hq, Hkv, D, qb, kb = 1, 11, 4, 2, 3, 4, 3
    q, k, v = _qkv(B, T, T, Hq, Hkv, D, 5)
    o, scores, lse = block_stats_reference(q, k, v, q_block=qb, kv_block=kb, return_lse=True)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    nqb, nkb = -(-T // qb), -(-T // kb)
    for h in range(Hq):
        g = h // (Hq // Hkv)
        s = qn[0, :, h] @ kn[0, :, g].T / np.sqrt(D)
        s[np.triu_indices(T, 1)] = -np.inf
        lse_h = np.log(np.exp(s).sum(1))
        p = np.exp(s - lse_h[:, None])
        np.testing.assert_allclose(lse[0, :, h], lse_h, atol=1e-5)
        np.testing.assert_allclose(o[0, :, h], p @ vn[0, :, g], atol=1e-5)
        for i_blk in range(nqb):
            for j_blk in range(nkb):
                tile = p[i_blk * qb:(i_blk + 1) * qb, j_blk * kb:(j_blk + 1) * kb]
                np.testing.assert_allclose(scores[0, h, i_blk, j_blk], tile.max(), atol=1e-6)
    assert (np.asarray(scores)[0, :, 0, 2:] == 0).all()  # tiles above the diagonal: no visible pair


@pytest.mark.parametrize("Tq, Tk, Hq, Hkv, qb, kb, causal, per_step", [
    (37, 37, 4, 2, 8, 5, True, 2),     # GQA, blocks that divide neither length, three steps (the last padded)
    (20, 20, 3, 3, 4, 4, True, None),  # MHA, whole blocks, the default steps
    (9, 23, 2, 1, 4, 6, False, 1),     # MQA cross attention, not causal
], ids=["gqa_awkward", "mha", "mqa_cross"])
def test_xla_equals_the_reference(Tq, Tk, Hq, Hkv, qb, kb, causal, per_step):
    q, k, v = _qkv(2, Tq, Tk, Hq, Hkv, 8, 6)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal((2, Tq, Hq, 6)), jnp.float32)

    def run(impl, q, k, v):
        def loss(q, k, v):
            o, scores, lse = impl(q, k, v, q_block=qb, kv_block=kb, causal=causal, return_lse=True)
            return jnp.sum(o * ct), (o, scores, lse)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    xla = jax.jit(lambda *a: run(lambda *b, **kw: block_stats_xla(*b, **kw, q_blocks_per_step=per_step), *a))
    ref = jax.jit(lambda *a: run(block_stats_reference, *a))
    (_, (o_x, s_x, lse_x)), g_x = xla(q, k, v)
    (_, (o_r, s_r, lse_r)), g_r = ref(q, k, v)
    assert s_x.shape == (2, Hq, -(-Tq // qb), -(-Tk // kb)) and s_x.dtype == jnp.float32
    np.testing.assert_allclose(o_x, o_r, atol=1e-5)
    np.testing.assert_allclose(lse_x, lse_r, atol=1e-5)
    np.testing.assert_allclose(s_x, s_r, atol=1e-6)
    for name, a, b in zip("qkv", g_x, g_r):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


def test_block_scores_carry_no_gradient():
    q, k, v = _qkv(1, 12, 12, 2, 1, 4, 4)
    for impl in ("reference", "xla"):
        def total(q, k, impl=impl):
            return block_stats_attention(q, k, v, q_block=4, kv_block=4, implementation=impl)[1].sum()
        grads = jax.jit(jax.grad(total, argnums=(0, 1)))(q, k)
        assert all(float(jnp.abs(g).max()) == 0 for g in grads), impl


def test_xla_builds_no_square_buffer_and_no_repeated_kv():
    """Traced, not run: at Tq = Tk = 2048 no array in the xla path's forward + backward has Tq · Tk elements (the
    reference's does); with Hq = 4 · Hkv and short queries, no array ending in D is as large as K repeated per query
    head (B · Tk · Hq · D elements)."""
    B, T, H, D = 1, 2048, 1, 16
    qkv = [jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)] * 3

    def loss(impl):
        return jax.grad(lambda q, k, v: impl(q, k, v, q_block=64, kv_block=64)[0].sum(), argnums=(0, 1, 2))

    assert _largest_array(jax.make_jaxpr(loss(block_stats_reference))(*qkv).jaxpr) >= T * T
    assert _largest_array(jax.make_jaxpr(loss(block_stats_xla))(*qkv).jaxpr) < T * T

    B, Tq, Tk, Hq, Hkv, D = 1, 16, 256, 8, 2, 16
    shapes = (jax.ShapeDtypeStruct((B, Tq, Hq, D), jnp.float32), jax.ShapeDtypeStruct((B, Tk, Hkv, D), jnp.float32),
              jax.ShapeDtypeStruct((B, Tk, Hkv, D), jnp.float32))
    jaxpr = jax.make_jaxpr(lambda q, k, v: block_stats_xla(q, k, v, q_block=8, kv_block=8, causal=False))(*shapes)

    def trailing_d_sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if shape and shape[-1] == D:
                    yield int(np.prod(shape))
            for param in eqn.params.values():
                for inner in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        yield from trailing_d_sizes(inner)

    assert max(trailing_d_sizes(jaxpr.jaxpr)) < B * Tk * Hq * D


def test_bad_shapes_fail_in_one_line():
    q, k, v = _qkv(1, 8, 8, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="query heads 3 must be a multiple of kv heads 2"):
        block_stats_attention(q, k, v, q_block=4, kv_block=4)
    with pytest.raises(ValueError, match="q_block and kv_block must be positive"):
        block_stats_attention(q[:, :, :2], k, v, q_block=0, kv_block=4)
