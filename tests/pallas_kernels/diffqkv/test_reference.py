"""DiffQKV oracle: the textbook loop, the Sigma paper's properties, selective V."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.attention import attention_reference
from effarch.pallas_kernels.diffqkv import diffqkv_reference, head_index, selective_v_reference
from tests.helpers.numerics import assert_close, rel_err
from tests.pallas_kernels.diffqkv.inputs import K, make_inputs


def numpy_diffqkv(q, k, v, q_offset=0):
    """Loop over (b, i, t) in float64 with the literal head maps floor(i * Hk / Hq) and floor(i * Hv / Hq)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    Bq, T, Hq, Kq = q.shape
    Hk, Hv = k.shape[2], v.shape[2]
    out = np.zeros((Bq, T, Hq, v.shape[-1]))
    for b in range(Bq):
        for i in range(Hq):
            for t in range(T):
                keys = np.arange(min(q_offset + t + 1, k.shape[1]))
                logits = k[b, keys, (i * Hk) // Hq] @ q[b, t, i] / np.sqrt(Kq)
                p = np.exp(logits - logits.max())
                out[b, t, i] = (p / p.sum()) @ v[b, keys, (i * Hv) // Hq]
    return out


def test_head_index_known_answer():
    # 32 / 4 / 16 (Sigma-1.5B): query heads 0-7 read K head 0, heads 0 and 1 read V head 0, head 31 reads V head 15.
    assert head_index(32, 4).tolist() == [i // 8 for i in range(32)]
    assert head_index(32, 16).tolist() == [i // 2 for i in range(32)]
    # A count that does not divide: floor(i * 4 / 6) for i < 6.
    assert head_index(6, 4).tolist() == [0, 0, 1, 2, 2, 3]


@pytest.mark.parametrize("Hq, Hk, Hv", [(12, 2, 4), (6, 4, 3), (5, 5, 1)])
def test_reference_matches_numpy_loop(Hq, Hk, Hv):
    q, k, v, _ = make_inputs(0, T=11, S=11, Hq=Hq, Hk=Hk, Hv=Hv)
    out = jax.jit(diffqkv_reference)(q, k, v)
    assert_close("out", out, numpy_diffqkv(q, k, v), 1e-6)


def test_reference_q_offset_equals_rows_of_full_causal():
    q, k, v, _ = make_inputs(1, T=13, S=13, Hq=6, Hk=1, Hv=3)
    full = diffqkv_reference(q, k, v)
    tail = jax.jit(diffqkv_reference)(q[:, 9:], k, v, q_offset=jnp.int32(9))
    assert_close("tail", tail, full[:, 9:], 1e-6)


@pytest.mark.parametrize("Hq, Hkv", [(6, 3), (6, 1), (5, 5)])
def test_equal_k_and_v_heads_is_gqa(Hq, Hkv):
    # Property 1 (§6.3): with Hk = Hv and K == V the op is grouped-query attention.
    q, k, _, _ = make_inputs(2, T=11, S=11, Hq=Hq, Hk=Hkv, Hv=Hkv)
    v = make_inputs(3, T=11, S=11, Hq=Hq, Hk=Hkv, Hv=Hkv)[1]
    out = diffqkv_reference(q, k, v)
    assert_close("gqa", out, attention_reference(q, k, v, causal=True), 1e-6)
    assert_close("jax.nn", out, jax.nn.dot_product_attention(q, k, v, is_causal=True), 1e-5)


@pytest.mark.parametrize("Hq, Hk, Hv", [(12, 2, 4), (8, 1, 8), (6, 4, 3), (6, 2, 3)])
def test_duplicating_k_heads_to_v_heads_changes_nothing(Hq, Hk, Hv):
    # Property 2 (§6.3, paper App. E kv_group_sharing): repeat K to Hv heads, V head j getting the K head its query
    # heads already read: floor(floor(i * Hv / Hq) * Hk / Hv) = floor(i * Hk / Hq) when Hk | Hv | Hq (32 / 4 / 16).
    q, k, v, _ = make_inputs(4, T=11, S=11, Hq=Hq, Hk=Hk, Hv=Hv)
    k_dup = k[:, :, head_index(Hv, Hk)]
    out, out_dup = diffqkv_reference(q, k, v), diffqkv_reference(q, k_dup, v)
    if Hv % Hk == 0 and Hq % Hv == 0:
        np.testing.assert_array_equal(np.asarray(out_dup), np.asarray(out))
    else:
        # Groups that do not nest: query head 3 of 6 / 2 / 3 reads K head floor(6 / 6) = 1, but its V head 1 has
        # the copy of K head floor(2 / 3) = 0. Duplication is exact only when the K groups are unions of V groups.
        assert rel_err(out_dup, out) > 1e-3


def test_selective_v_known_answer():
    # One head, keys with logits [0, log 2, log 5] at scale 1: alpha = [1, 2, 5] / 8; V = [[1], [10], [100]].
    q = jnp.ones((1, 1, 1, 1))
    k = jnp.log(jnp.array([1.0, 2.0, 5.0])).reshape(1, 3, 1, 1)
    v = jnp.array([1.0, 10.0, 100.0]).reshape(1, 3, 1, 1)
    select = functools.partial(selective_v_reference, q, k, v, scale=1.0, q_offset=2)
    np.testing.assert_allclose(float(select(top_n=3)[0, 0, 0, 0]), (1 + 20 + 500) / 8, rtol=1e-6)
    np.testing.assert_allclose(float(select(top_n=2)[0, 0, 0, 0]), (20 + 500) / 8, rtol=1e-6)
    np.testing.assert_allclose(float(select(top_n=2, renormalize=True)[0, 0, 0, 0]), (20 + 500) / 7, rtol=1e-6)
    np.testing.assert_allclose(float(select(top_n=1)[0, 0, 0, 0]), 500 / 8, rtol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_selective_v_with_n_at_least_t_is_full_attention(renormalize):
    # Property 3 (§6.3).
    q, k, v, _ = make_inputs(5, T=11, S=11, Hq=12, Hk=2, Hv=4)
    full = diffqkv_reference(q, k, v)
    for n in (11, 40):
        assert_close(f"N={n}", selective_v_reference(q, k, v, top_n=n, renormalize=renormalize), full, 1e-6)
    # Fewer rows than visible keys must change the later queries (which see more than 4 keys).
    assert rel_err(selective_v_reference(q, k, v, top_n=4, renormalize=renormalize)[:, 4:], full[:, 4:]) > 1e-3
    np.testing.assert_allclose(
        np.asarray(selective_v_reference(q, k, v, top_n=4, renormalize=renormalize)[:, :4]),
        np.asarray(full[:, :4]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_selective_v_rejects_non_positive_n():
    q, k, v, _ = make_inputs(6, T=3, S=3, Hq=2, Hk=1, Hv=1)
    with pytest.raises(ValueError, match="top_n"):
        selective_v_reference(q, k, v, top_n=0)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = make_inputs(7, T=5, S=5, Hq=4, Hk=2, Hv=4)
    out = diffqkv_reference(q, k, v)
    assert_close("scale", out, diffqkv_reference(q, k, v, scale=K**-0.5), 1e-6)
    assert rel_err(out, diffqkv_reference(q, k, v, scale=1.0)) > 1e-2
