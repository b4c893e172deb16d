"""The transposed block lists: for each key block, the query blocks whose lists name it (what dK/dV loop over).

The forward and dQ passes walk, per query block I, the key blocks J of its list (block_idx, block_cnt). dK and dV
of key block J sum over the query blocks that attend to J, so the backward needs the same relation read the other
way. It is built in jnp, so it works on traced (data-dependent) lists: per (batch row, list group) the valid (I, J)
pairs are stably sorted on J, so each key block's query blocks come out in increasing I, one run per key block.

Two forms of the sorted pairs:
- `key_major_pairs`: the pairs themselves, P = nQb · Kmax per row (as many as the lists have slots), with each key
  block's run start and length: what the kernels read. The TPU kernel's dK/dV grid walks the pairs (one step per
  slot, the same count as the forward's grid), so its scalar memory and its grid never exceed the forward's.
- `transpose_lists`: q_idx [B, Hs, nKb, C_T], q_cnt [B, Hs, nKb], the lists of the transposed relation in the
  op's own layout (C_T static; nQb always suffices, since listed ids are unique within a row).
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


def _pairs_row(idx_IC: Int[Array, "nQb Kmax"], cnt_I: Int[Array, " nQb"], n_kv_blocks: int):
    n_q_blocks, kmax = idx_IC.shape
    used = jnp.arange(kmax)[None, :] < cnt_I[:, None]
    valid = used & (idx_IC >= 0) & (idx_IC < n_kv_blocks)
    key = jnp.where(valid, idx_IC, n_kv_blocks).reshape(-1)  # invalid slots sort last
    query = jnp.broadcast_to(jnp.arange(n_q_blocks, dtype=jnp.int32)[:, None], idx_IC.shape).reshape(-1)
    order = jnp.argsort(key, stable=True)
    key_sorted, query_sorted = key[order], query[order]
    q_cnt = jnp.zeros((n_kv_blocks,), jnp.int32).at[key].add(1, mode="drop")
    start = jnp.cumsum(q_cnt) - q_cnt  # first sorted slot of each key block's run
    n_pairs = jnp.sum(q_cnt)
    # Slots past the valid pairs repeat the last valid pair (pair (0, 0) when there is none): a kernel stepping over
    # them names blocks it already holds and computes nothing (slot ≥ n_pairs).
    last = jnp.maximum(n_pairs - 1, 0)
    tail = jnp.arange(key.shape[0]) >= n_pairs
    pair_k = jnp.where(tail, jnp.where(n_pairs > 0, key_sorted[last], 0), key_sorted)
    pair_q = jnp.where(tail, jnp.where(n_pairs > 0, query_sorted[last], 0), query_sorted)
    return pair_q, pair_k, start.astype(jnp.int32), q_cnt, n_pairs.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n_kv_blocks",))
def key_major_pairs(
    block_idx: Int[Array, "B Hs nQb Kmax"], block_cnt: Int[Array, "B Hs nQb"], n_kv_blocks: int
) -> tuple[Int[Array, "B Hs P"], Int[Array, "B Hs P"], Int[Array, "B Hs nKb"], Int[Array, "B Hs nKb"],
           Int[Array, "B Hs"]]:
    """(pair_q, pair_k, start, q_cnt, n_pairs), P = nQb · Kmax: slots s < n_pairs[b, g] hold the listed pairs
    (I = pair_q, J = pair_k) sorted on J, then I; key block J's run is slots [start, start + q_cnt); later slots
    repeat the last pair."""
    B, Hs, n_q_blocks, kmax = block_idx.shape
    flat_idx = jnp.asarray(block_idx, jnp.int32).reshape(B * Hs, n_q_blocks, kmax)
    flat_cnt = jnp.asarray(block_cnt, jnp.int32).reshape(B * Hs, n_q_blocks)
    out = jax.vmap(lambda i, c: _pairs_row(i, c, n_kv_blocks))(flat_idx, flat_cnt)
    return tuple(x.reshape(B, Hs, *x.shape[1:]) for x in out)


@functools.partial(jax.jit, static_argnames=("n_kv_blocks", "bound"))
def transpose_lists(
    block_idx: Int[Array, "B Hs nQb Kmax"], block_cnt: Int[Array, "B Hs nQb"], n_kv_blocks: int, bound: int
) -> tuple[Int[Array, "B Hs nKb C_T"], Int[Array, "B Hs nKb"]]:
    """(q_idx, q_cnt): q_idx[b, g, J, :q_cnt[b, g, J]] are the query blocks I (increasing) whose list names J;
    unused slots are -1. `bound` is C_T: a key block named more than `bound` times is cut off (nQb never is)."""
    pair_q, _, start, q_cnt, _ = key_major_pairs(block_idx, block_cnt, n_kv_blocks)
    ranks = jnp.arange(bound)[None, None, None, :]
    slot = start[..., None] + ranks  # [B, Hs, nKb, C_T]
    listed = ranks < q_cnt[..., None]
    B, Hs, P = pair_q.shape
    gathered = jnp.take_along_axis(pair_q, jnp.minimum(slot, P - 1).reshape(B, Hs, -1), axis=-1)
    q_idx = jnp.where(listed, gathered.reshape(slot.shape), -1)
    return q_idx, jnp.minimum(q_cnt, bound)
