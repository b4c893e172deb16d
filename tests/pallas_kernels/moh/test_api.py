"""mixture_of_heads_attention: the oracle against a float64 loop, dense and sparse == reference (values and
gradients) at awkward shapes, and the sparse path's FLOPs falling with the share of active heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.moh import mixture_of_heads_attention, mixture_of_heads_reference
from effarch.pallas_kernels.moh.xla import num_blocks
from tests.helpers.numerics import assert_close, value_and_grads

B, H, K, D = 2, 5, 3, 7


def make_inputs(seed, *, T, S=None, Hkv=H, A=3):
    rng = np.random.default_rng(seed)
    S = T if S is None else S

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    q, k, v = normal(B, T, H, K), normal(B, S, Hkv, K), normal(B, S, Hkv, K)
    # A distinct heads per token, in random order, so groups get ragged sizes.
    heads = jnp.asarray(np.argsort(rng.random((B, T, H)), axis=-1)[..., :A], jnp.int32)
    gates = normal(B, T, A)
    w_o = normal(H, K, D)
    cotangent = normal(B, T, D)
    return q, k, v, heads, gates, w_o, cotangent


def numpy_moh(q, k, v, heads, gates, w_o, positions):
    q, k, v, gates, w_o = (np.asarray(a, np.float64) for a in (q, k, v, gates, w_o))
    out = np.zeros((q.shape[0], q.shape[1], w_o.shape[-1]))
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            for a, h in enumerate(np.asarray(heads[b, t])):
                keys = np.arange(positions[t] + 1)
                logits = k[b, keys, h // group] @ q[b, t, h] / np.sqrt(q.shape[-1])
                p = np.exp(logits - logits.max())
                out[b, t] += gates[b, t, a] * (p / p.sum()) @ v[b, keys, h // group] @ w_o[h]
    return out


@pytest.mark.parametrize("Hkv", [5, 1])
def test_reference_matches_numpy_loop(Hkv):
    q, k, v, heads, gates, w_o, _ = make_inputs(0, T=7, Hkv=Hkv)
    expected = numpy_moh(q, k, v, heads, gates, w_o, np.arange(7))
    assert_close("reference", mixture_of_heads_reference(q, k, v, heads, gates, w_o), expected, 1e-5)


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
@pytest.mark.parametrize(
    "T, Hkv, A, block",
    [(11, 5, 3, 4), (13, 1, 2, 16), (7, 5, 5, 1), (1, 5, 2, 16)],
    ids=["T11_mha_blk4", "T13_mqa_blk_gt_T", "all_heads_blk1", "T1"],
)
def test_fwd_bwd_matches_reference(implementation, T, Hkv, A, block):
    q, k, v, heads, gates, w_o, ct = make_inputs(1, T=T, Hkv=Hkv, A=A)

    def run(impl):
        def fn(q, k, v, gates, w_o):
            return mixture_of_heads_attention(q, k, v, heads, gates, w_o, block_size=block, implementation=impl)

        # One compiled program per path: eager op-by-op dispatch dominates these small shapes on CPU.
        return jax.jit(lambda *args: value_and_grads(fn, args, ct))(q, k, v, gates, w_o)

    out, grads = run(implementation)
    out_ref, grads_ref = run("reference")
    assert_close(f"{implementation} out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dgates", "dw_o"), grads, grads_ref):
        assert_close(f"{implementation} {name}", g, g_ref, 1e-5)


@pytest.mark.parametrize("implementation", ["reference", "dense", "sparse"])
def test_cache_positions_match_numpy_loop(implementation):
    # Queries at positions 6..9 against a 13-slot cache: keys past each query's position must stay hidden.
    q, k, v, heads, gates, w_o, _ = make_inputs(2, T=4, S=13, Hkv=1)
    positions = jnp.arange(6, 10)
    y = jax.jit(lambda *args: mixture_of_heads_attention(*args, q_positions=positions, block_size=3,
                                                         implementation=implementation))(q, k, v, heads, gates, w_o)
    assert_close(implementation, y, numpy_moh(q, k, v, heads, gates, w_o, np.arange(6, 10)), 1e-5)


def test_inactive_heads_do_not_matter():
    # Changing the queries of heads no token selects leaves every path's output unchanged.
    q, k, v, _, gates, w_o, _ = make_inputs(3, T=9, A=2)
    heads = jnp.broadcast_to(jnp.asarray([3, 1], jnp.int32), (B, 9, 2))
    q2 = q.at[:, :, 0].add(5.0).at[:, :, 4].add(-3.0)
    for impl in ("reference", "dense", "sparse"):
        fn = jax.jit(lambda q, impl=impl: mixture_of_heads_attention(q, k, v, heads, gates, w_o, implementation=impl))
        np.testing.assert_array_equal(np.asarray(fn(q)), np.asarray(fn(q2)))


def test_num_blocks_bound_is_tight_and_sufficient():
    assert num_blocks(n_pairs=6, n_groups=10, block_size=1) == 6
    # 3 groups of 5 pairs with blocks of 4: 2 blocks each; the bound (15 + 3·3) // 4 = 6 is reached.
    assert num_blocks(15, 3, 4) == 6


def _flops(implementation, A, *, T=64, Hh=8):
    rng = np.random.default_rng(0)
    q = jnp.zeros((1, T, Hh, 16))
    heads = jnp.asarray(np.argsort(rng.random((1, T, Hh)), axis=-1)[..., :A], jnp.int32)
    gates, w_o = jnp.ones((1, T, A)), jnp.zeros((Hh, 16, 32))
    fn = jax.jit(lambda q, k, v, heads, g, w: mixture_of_heads_attention(q, k, v, heads, g, w, block_size=8,
                                                                          implementation=implementation))
    return fn.lower(q, q, q, heads, gates, w_o).compile().cost_analysis()["flops"]


def test_sparse_flops_fall_with_active_heads():
    # The sparse path's compiled FLOPs at 4 of 8 heads are well under those at 8 of 8; the dense path's are not.
    sparse = {a: _flops("sparse", a) for a in (8, 4)}
    dense = {a: _flops("dense", a) for a in (8, 4)}
    assert sparse[4] < 0.65 * sparse[8], sparse
    assert dense[4] > 0.95 * dense[8], dense


def test_bad_shapes_are_named():
    q, k, v, heads, gates, w_o, _ = make_inputs(4, T=5)
    with pytest.raises(ValueError, match="kv heads"):
        mixture_of_heads_attention(q, k[:, :, :2], v[:, :, :2], heads, gates, w_o)
    with pytest.raises(ValueError, match="queries' length"):
        mixture_of_heads_attention(q, k[:, :4], v[:, :4], heads, gates, w_o)
    with pytest.raises(ValueError, match="unknown implementation"):
        mixture_of_heads_attention(q, k, v, heads, gates, w_o, implementation="pallas")
