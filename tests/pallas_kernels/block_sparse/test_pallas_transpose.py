"""The transposed lists of the kernels' dK/dV pass (pallas_kernels/block_sparse/transpose.py) against numpy sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.block_sparse.transpose import key_major_pairs, transpose_lists
from tests.pallas_kernels.block_sparse.test_reference import random_lists


def as_sets(idx, cnt):
    """{(b, g, row): set of listed ids} of lists in the op's layout."""
    return {key: set(idx[key][: cnt[key]].tolist()) for key in np.ndindex(cnt.shape)}


@pytest.mark.parametrize("n_q_blocks,n_kv_blocks,kmax", [(5, 7, 3), pytest.param(6, 4, 4, marks=pytest.mark.slow),
                                                         pytest.param(1, 3, 3, marks=pytest.mark.slow)])
def test_transpose_is_the_relation_read_the_other_way(n_q_blocks, n_kv_blocks, kmax):
    rng = np.random.default_rng(n_q_blocks)
    idx, cnt = (jnp.asarray(x) for x in random_lists(rng, 2, 3, n_q_blocks, n_kv_blocks, kmax))
    q_idx, q_cnt = (np.asarray(x) for x in transpose_lists(idx, cnt, n_kv_blocks, n_q_blocks))
    assert q_idx.shape == (2, 3, n_kv_blocks, n_q_blocks) and q_cnt.shape == (2, 3, n_kv_blocks)
    lists = as_sets(np.asarray(idx), np.asarray(cnt))
    expected = {(b, g, j): {i for i in range(n_q_blocks) if j in lists[b, g, i]}
                for b, g, j in np.ndindex(q_cnt.shape)}
    assert as_sets(q_idx, q_cnt) == expected
    for key in np.ndindex(q_cnt.shape):  # increasing query blocks, unused slots -1
        used = q_idx[key][: q_cnt[key]]
        assert (np.diff(used) > 0).all() and (q_idx[key][q_cnt[key]:] == -1).all()
    # transpose ∘ transpose gives back the lists, as sets.
    back_idx, back_cnt = transpose_lists(jnp.asarray(q_idx), jnp.asarray(q_cnt), n_q_blocks, kmax)
    assert as_sets(np.asarray(back_idx), np.asarray(back_cnt)) == lists

    # The pair form: runs sorted on J, each J's run at [start, start + q_cnt), the tail repeating the last pair.
    pair_q, pair_k, start, runs, n_pairs = (np.asarray(x) for x in key_major_pairs(idx, cnt, n_kv_blocks))
    np.testing.assert_array_equal(runs, q_cnt)
    for b, g in np.ndindex(n_pairs.shape):
        n = n_pairs[b, g]
        assert n == sum(len(s) for key, s in lists.items() if key[:2] == (b, g))
        assert (np.diff(pair_k[b, g, :n]) >= 0).all()
        for j in range(n_kv_blocks):
            run = slice(start[b, g, j], start[b, g, j] + runs[b, g, j])
            assert (pair_k[b, g, run] == j).all() and set(pair_q[b, g, run].tolist()) == expected[b, g, j]
        tail = (pair_q[b, g, n - 1], pair_k[b, g, n - 1]) if n else (0, 0)
        assert (pair_q[b, g, n:] == tail[0]).all() and (pair_k[b, g, n:] == tail[1]).all()


def test_traced_lists():
    rng = np.random.default_rng(1)
    idx, cnt = (jnp.asarray(x) for x in random_lists(rng, 1, 2, 4, 6, 3))
    q_idx, q_cnt = jax.jit(lambda i, c: transpose_lists(i, c, 6, 4))(idx, cnt)
    expected = transpose_lists(idx, cnt, 6, 4)
    np.testing.assert_array_equal(q_idx, expected[0])
    np.testing.assert_array_equal(q_cnt, expected[1])
