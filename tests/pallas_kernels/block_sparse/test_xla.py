"""The gathered-block XLA path against the dense oracle: values, lse and gradients, awkward shapes, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.block_sparse import api, block_sparse_attention, block_sparse_reference, random_causal_lists
from effarch.pallas_kernels.block_sparse.xla import block_sparse_xla
from tests.pallas_kernels.block_sparse.test_reference import random_lists

ATOL = 1e-5


def _normal(rng, *shapes, dtype=jnp.float32):
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _loss(impl, idx, cnt, ct, **kw):
    """(q, k, v) -> ((value, (o, lse)), (dq, dk, dv)) of <o, ct> + Σ finite lse: one scalar that exercises o, lse and
    their gradients."""

    def loss(q, k, v, idx, cnt):
        o, lse = impl(q, k, v, idx, cnt, return_lse=True, **kw)
        value = jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return value, (o, lse)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return lambda q, k, v: grad(q, k, v, idx, cnt)


def _assert_matches_reference(q, k, v, idx, cnt, *, xla_kw=None, via_api=False, **kw):
    """xla == reference in o, lse (-inf at the same rows), loss and dq, dk, dv at 1e-5; each jitted once, the lists
    traced (jit arguments). via_api: the xla side is `block_sparse_attention` with the platform's default order."""
    rng = np.random.default_rng(123)
    ct = jnp.asarray(rng.standard_normal(q.shape[:3] + v.shape[3:]), jnp.float32)
    idx, cnt = jnp.asarray(idx), jnp.asarray(cnt)

    def xla(*args, **kw_):
        if via_api:
            return block_sparse_attention(*args, **kw_)
        return block_sparse_xla(*args, **kw_, **(xla_kw or {}))

    run = jax.jit(lambda impl_is_xla, q, k, v, idx, cnt: _loss(xla if impl_is_xla else block_sparse_reference,
                                                                 idx, cnt, ct, **kw)(q, k, v), static_argnums=0)
    (value_x, (o_x, lse_x)), grads_x = run(True, q, k, v, idx, cnt)
    (value_r, (o_r, lse_r)), grads_r = run(False, q, k, v, idx, cnt)
    np.testing.assert_allclose(o_x, o_r, atol=ATOL)
    np.testing.assert_array_equal(np.isneginf(lse_x), np.isneginf(lse_r))
    finite = np.isfinite(lse_r)
    np.testing.assert_allclose(np.where(finite, lse_x, 0), np.where(finite, lse_r, 0), atol=ATOL)
    np.testing.assert_allclose(value_x, value_r, rtol=1e-5)
    for name, gx, gr in zip("qkv", grads_x, grads_r):
        assert np.all(np.isfinite(gx)), f"d{name} not finite"
        np.testing.assert_allclose(gx, gr, atol=ATOL, err_msg=f"d{name}")
    return np.asarray(lse_r)


@pytest.mark.parametrize("hs_kind, causal", [
    ("one", True), ("kv", False), ("q", True),
    pytest.param("one", False, marks=pytest.mark.slow),
    pytest.param("kv", True, marks=pytest.mark.slow),
    pytest.param("q", False, marks=pytest.mark.slow),
])
def test_xla_matches_reference_with_every_predicate(hs_kind, causal):
    """Random unsorted per-group lists (empty and full rows), GQA, Tq != Tk, odd D != Dv, q_block != kv_block,
    permuted positions with padding, segments, per-group window + sinks; 2 query blocks per step (nQb = 4 pads)."""
    rng = np.random.default_rng({"one": 0, "kv": 1, "q": 2}[hs_kind] + 10 * causal)
    B, Tq, Tk, Hq, Hkv, D, Dv = 2, 11, 13, 4, 2, 5, 3
    q_block, kv_block = 3, 4
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[hs_kind]
    n_q, n_kv = -(-Tq // q_block), -(-Tk // kv_block)
    idx, cnt = random_lists(rng, B, Hs, n_q, n_kv, kmax=3)
    q, k, v = _normal(rng, (B, Tq, Hq, D), (B, Tk, Hkv, D), (B, Tk, Hkv, Dv))
    q_pos = np.stack([rng.permutation(Tq) for _ in range(B)]).astype(np.int32)
    kv_pos = np.stack([rng.permutation(Tk) for _ in range(B)]).astype(np.int32)
    q_pos[0, 2] = kv_pos[1, 5] = -1
    window = rng.integers(2, 9, size=Hs).astype(np.int32)
    n_sink = rng.integers(0, 3, size=Hs).astype(np.int32)
    seg = (jnp.asarray(rng.integers(0, 2, size=(B, Tq))), jnp.asarray(rng.integers(0, 2, size=(B, Tk))))
    lse = _assert_matches_reference(
        q, k, v, idx, cnt, q_block=q_block, kv_block=kv_block, causal=causal, window=window, n_sink=n_sink,
        q_pos=jnp.asarray(q_pos), kv_pos=jnp.asarray(kv_pos), segment_ids=seg, scale=0.7,
        xla_kw=dict(q_blocks_per_step=2))
    assert np.isneginf(lse).any() and np.isfinite(lse).any()  # the case covers empty and non-empty rows


def test_xla_default_positions_gqa_per_kv_head_through_the_api():
    """Plain causal self-attention (default positions), Hs = Hkv, T not a multiple of the blocks, one step, through
    `block_sparse_attention`'s default dispatch, which is the xla path on every platform."""
    assert all(order == ("xla",) for order in api.DEFAULT_ORDER.values())
    rng = np.random.default_rng(3)
    B, T, Hq, Hkv, D = 1, 21, 6, 2, 8
    n_q, n_kv = -(-T // 4), -(-T // 8)
    idx, cnt = random_lists(rng, B, Hkv, n_q, n_kv, kmax=2)
    q, k, v = _normal(rng, (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D))
    _assert_matches_reference(q, k, v, idx, cnt, q_block=4, kv_block=8, via_api=True)


def test_full_lists_equal_dense_causal_attention():
    rng = np.random.default_rng(4)
    B, T, Hq, Hkv, D, bs = 2, 24, 4, 2, 16, 8
    q, k, v = _normal(rng, (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D))
    n = T // bs
    # Every block, in reversed order: the lists may be unsorted.
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[::-1], (B, 1, n, n))
    cnt = jnp.full((B, 1, n), n, jnp.int32)
    ct = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)

    def loss(attn):  # o only (no lse): the backward gets a zero lse cotangent
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v) * ct), argnums=(0, 1, 2)))

    value, grads = loss(lambda q, k, v: block_sparse_xla(q, k, v, idx, cnt, q_block=bs, kv_block=bs))(q, k, v)
    value_ref, grads_ref = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))(q, k, v)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=ATOL, err_msg=f"d{name}")


def test_empty_lists_give_zero_output_minus_inf_lse_and_zero_finite_gradients():
    rng = np.random.default_rng(5)
    B, T, H, D = 1, 8, 2, 4
    q, k, v = _normal(rng, (B, T, H, D), (B, T, H, D), (B, T, H, D))
    idx = jnp.zeros((B, H, 2, 2), jnp.int32)
    cnt = jnp.zeros((B, H, 2), jnp.int32)
    o, lse = block_sparse_xla(q, k, v, idx, cnt, q_block=4, kv_block=4, return_lse=True)
    assert not np.any(o) and np.all(np.isneginf(lse))
    _, grads = jax.jit(_loss(block_sparse_xla, idx, cnt, jnp.ones((B, T, H, D)), q_block=4, kv_block=4))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g)) and not np.any(g)


def test_bf16_inputs_stay_close_to_the_float32_reference():
    """bf16 q/k/v (f32 accumulation inside): within bf16 rounding of the f32 oracle on the same rounded inputs."""
    rng = np.random.default_rng(6)
    B, T, Hq, Hkv, D = 1, 32, 4, 2, 16
    q, k, v = _normal(rng, (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), dtype=jnp.bfloat16)
    idx, cnt = random_lists(rng, B, Hq, 4, 4, kmax=3)
    idx, cnt = jnp.asarray(idx), jnp.asarray(cnt)
    kw = dict(q_block=8, kv_block=8, causal=False)
    ct = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    (_, (o, lse)), grads = jax.jit(_loss(block_sparse_xla, idx, cnt, ct, **kw))(q, k, v)
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, (o_ref, lse_ref)), grads_ref = jax.jit(_loss(block_sparse_reference, idx, cnt, ct, **kw))(*as_f32)
    assert o.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3): the output's own rounding and the probabilities'
    # cast to bf16 for the contraction each cost about that; 2e-2 is a few ulps on values of order 1.
    np.testing.assert_allclose(o.astype(jnp.float32), o_ref, atol=2e-2, rtol=2e-2)
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, lse_ref, 0), atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), g_ref, atol=5e-2, rtol=5e-2)


def _largest_array(jaxpr) -> int:
    """Elements of the largest value any equation of `jaxpr` (or of a jaxpr nested in its params) produces."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape")]
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    sizes.append(_largest_array(inner))
    return max(sizes)


def test_no_quadratic_buffer_at_8192_tokens_and_10_percent_of_blocks():
    """Forward + backward at T = 8192, 10% of the blocks listed (traced and compiled, not run): no array in the xla
    path's jaxpr holds T · T elements (the reference's does: the check can fail), and the compiled temporaries are
    under 1/8 of one dense float32 score tensor, B · H · T · T · 4 bytes (the default steps bound the live scores;
    at T = 2048 the whole op is one step and its temporaries are ~0.74 of it: several score-sized buffers at 10%)."""
    B, T, H, D, bs = 1, 8192, 2, 64, 64
    n = T // bs
    idx, cnt = random_causal_lists(B, H, n, max(1, round(0.1 * n)), rng=7)
    idx, cnt = jnp.asarray(idx), jnp.asarray(cnt)
    qkv = [jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)] * 3
    ct = jnp.zeros((B, T, H, D))
    fns = {name: _loss(impl, idx, cnt, ct, q_block=bs, kv_block=bs)
           for name, impl in (("xla", block_sparse_xla), ("reference", block_sparse_reference))}
    assert _largest_array(jax.make_jaxpr(fns["reference"])(*qkv).jaxpr) >= T * T
    assert _largest_array(jax.make_jaxpr(fns["xla"])(*qkv).jaxpr) < T * T
    temp = jax.jit(fns["xla"]).lower(*qkv).compile().memory_analysis().temp_size_in_bytes
    dense = B * H * T * T * 4
    assert temp < dense / 8, f"temporaries {temp / 2**20:.1f} MiB vs dense scores {dense / 2**20:.0f} MiB"
