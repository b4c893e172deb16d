"""The transposed block lists: for each key block, the query blocks whose lists name it (what dK/dV loop over).

The forward and dQ passes walk, per query block I, the key blocks J of its list (block_idx, block_cnt). dK and dV
of key block J sum over the query blocks that attend to J, so the backward needs the same relation read the other
way: q_idx [B, Hs, nKb, C_T], q_cnt [B, Hs, nKb]. It is built in jnp, so it works on traced (data-dependent) lists:
the valid (I, J) pairs are stably sorted on J, so each key block's query blocks come out in increasing I (neighbouring
steps of a kernel often read the same query block again, which a TPU pipeline does not copy twice).

C_T, the length of a transposed list, must be static. Listed ids are unique within a row, so a key block is named at
most once per query block and nQb always suffices; for concrete lists `transposed_bound` gives the exact maximum,
which keeps a kernel's grid (one step per entry) as small as the pattern allows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int


def transposed_bound(block_idx, block_cnt, n_kv_blocks: int) -> int:
    """A static C_T: the largest number of query blocks naming one key block when the lists are concrete (at least
    1, so a grid axis never has size 0), else nQb (the worst case)."""
    n_q_blocks = block_idx.shape[2]
    if isinstance(block_idx, jax.core.Tracer) or isinstance(block_cnt, jax.core.Tracer):
        return n_q_blocks
    idx, cnt = np.asarray(block_idx), np.asarray(block_cnt)
    used = np.arange(idx.shape[-1]) < cnt[..., None]
    ids = np.where(used & (idx >= 0) & (idx < n_kv_blocks), idx, n_kv_blocks)
    flat = ids.reshape(-1, ids.shape[2] * ids.shape[3])
    counts = np.stack([np.bincount(row, minlength=n_kv_blocks + 1)[:n_kv_blocks] for row in flat])
    return max(1, int(counts.max(initial=0)))


def _transpose_row(idx_IC: Int[Array, "nQb Kmax"], cnt_I: Int[Array, " nQb"], n_kv_blocks: int, bound: int):
    n_q_blocks, kmax = idx_IC.shape
    used = jnp.arange(kmax)[None, :] < cnt_I[:, None]
    valid = used & (idx_IC >= 0) & (idx_IC < n_kv_blocks)
    key = jnp.where(valid, idx_IC, n_kv_blocks).reshape(-1)  # invalid entries sort last
    query = jnp.broadcast_to(jnp.arange(n_q_blocks, dtype=jnp.int32)[:, None], idx_IC.shape).reshape(-1)
    order = jnp.argsort(key, stable=True)
    key_sorted, query_sorted = key[order], query[order]
    q_cnt = jnp.zeros((n_kv_blocks,), jnp.int32).at[key].add(1, mode="drop")
    start = jnp.cumsum(q_cnt) - q_cnt  # first sorted slot of each key block
    rank = jnp.arange(key.shape[0], dtype=jnp.int32) - start[jnp.minimum(key_sorted, n_kv_blocks - 1)]
    # Invalid entries (key == nKb) fall outside the [nKb, bound] array and are dropped.
    q_idx = jnp.full((n_kv_blocks, bound), -1, jnp.int32).at[key_sorted, rank].set(query_sorted, mode="drop")
    return q_idx, jnp.minimum(q_cnt, bound)


@functools.partial(jax.jit, static_argnames=("n_kv_blocks", "bound"))
def transpose_lists(
    block_idx: Int[Array, "B Hs nQb Kmax"], block_cnt: Int[Array, "B Hs nQb"], n_kv_blocks: int, bound: int
) -> tuple[Int[Array, "B Hs nKb C_T"], Int[Array, "B Hs nKb"]]:
    """(q_idx, q_cnt): q_idx[b, g, J, :q_cnt[b, g, J]] are the query blocks I (increasing) whose list names J;
    unused slots are -1. `bound` is C_T (`transposed_bound`); a key block named more than `bound` times would be cut
    off, which `transposed_bound` never allows."""
    B, Hs, n_q_blocks, kmax = block_idx.shape
    flat_idx = jnp.asarray(block_idx, jnp.int32).reshape(B * Hs, n_q_blocks, kmax)
    flat_cnt = jnp.asarray(block_cnt, jnp.int32).reshape(B * Hs, n_q_blocks)
    q_idx, q_cnt = jax.vmap(lambda i, c: _transpose_row(i, c, n_kv_blocks, bound))(flat_idx, flat_cnt)
    return q_idx.reshape(B, Hs, n_kv_blocks, bound), q_cnt.reshape(B, Hs, n_kv_blocks)
