"""The transposed lists of the kernels' dK/dV pass (pallas_kernels/block_sparse/transpose.py) against numpy sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.block_sparse.transpose import transpose_lists, transposed_bound
from tests.pallas_kernels.block_sparse.test_reference import random_lists


def as_sets(idx, cnt):
    """{(b, g, row): set of listed ids} of lists in the op's layout."""
    return {key: set(idx[key][: cnt[key]].tolist()) for key in np.ndindex(cnt.shape)}


@pytest.mark.parametrize("n_q_blocks,n_kv_blocks,kmax", [(5, 7, 3), (6, 4, 4), (1, 3, 3)])
def test_transpose_is_the_relation_read_the_other_way(n_q_blocks, n_kv_blocks, kmax):
    rng = np.random.default_rng(n_q_blocks)
    idx, cnt = random_lists(rng, 2, 3, n_q_blocks, n_kv_blocks, kmax)
    bound = transposed_bound(idx, cnt, n_kv_blocks)
    q_idx, q_cnt = (np.asarray(x) for x in transpose_lists(jnp.asarray(idx), jnp.asarray(cnt), n_kv_blocks, bound))
    assert q_idx.shape == (2, 3, n_kv_blocks, bound) and q_cnt.shape == (2, 3, n_kv_blocks)
    lists = as_sets(idx, cnt)
    expected = {(b, g, j): {i for i in range(n_q_blocks) if j in lists[b, g, i]}
                for b, g, j in np.ndindex(q_cnt.shape)}
    assert as_sets(q_idx, q_cnt) == expected
    assert bound == max(1, max(len(s) for s in expected.values()))
    for key in np.ndindex(q_cnt.shape):  # increasing query blocks, unused slots -1
        used = q_idx[key][: q_cnt[key]]
        assert (np.diff(used) > 0).all() and (q_idx[key][q_cnt[key]:] == -1).all()
    # transpose ∘ transpose gives back the lists, as sets.
    back_idx, back_cnt = transpose_lists(jnp.asarray(q_idx), jnp.asarray(q_cnt), n_q_blocks, kmax)
    assert as_sets(np.asarray(back_idx), np.asarray(back_cnt)) == lists


def test_traced_lists_use_the_worst_case_bound():
    rng = np.random.default_rng(1)
    idx, cnt = (jnp.asarray(x) for x in random_lists(rng, 1, 2, 4, 6, 3))

    def fn(idx, cnt):
        bound = transposed_bound(idx, cnt, 6)
        assert bound == 4  # nQb: traced lists cannot be inspected
        return transpose_lists(idx, cnt, 6, bound)

    q_idx, q_cnt = jax.jit(fn)(idx, cnt)
    expected = transpose_lists(idx, cnt, 6, 4)
    np.testing.assert_array_equal(q_idx, expected[0])
    np.testing.assert_array_equal(q_cnt, expected[1])
