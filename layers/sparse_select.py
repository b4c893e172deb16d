"""Block pooling and score-to-list selection shared by the dynamic patterns of `sparse_attention` (mean_topk,
seer): from scores [B, Hs, nQ, nK] of key block J for a query row in block I, the causal lists of
`pallas_kernels.block_sparse.block_sparse_attention`.

Selection rules (per row, I the row's query block):
- candidates are the earlier blocks J < I; block I itself (the diagonal) and the first `sink_blocks` blocks are
  always read (SeerAttention does not force the diagonal, so a row of its could read nothing; here it always reads
  its own block, which keeps every row's own token visible);
- top-k: the row reads k blocks in all, the forced ones included: the forced blocks and the k - (forced) best
  candidates (every causal block when I + 1 <= k); k is fixed (`top_k`) or follows the number of blocks nB of the
  call through SeerAttention's nz_ratio rule k = max(1, int((1 - sqrt(1 - r)) nB)) (`density_k`), the same k for
  every row, which makes the causal block triangle's density about r;
- threshold: the candidates whose probability (softmax of the row's scores over J <= I) exceeds τ
  (SeerAttention's threshold mode).

The lists come out ordered by score (forced blocks first), padded with unused entries (the op ignores entries past
`block_cnt`). Indices carry no gradient: the scores only rank.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def block_pool(x: Float[Array, "B T H K"], block: int, how: str = "mean") -> Float[Array, "B nB H K"]:
    """Pools x over blocks of `block` tokens along T in float32 ("mean", "max" or "min"); a partial last block is
    pooled over its own tokens (ceil mode, as SeerAttention's pooling)."""
    B, T, H, K = x.shape
    nb = -(-T // block)
    x = x.astype(jnp.float32)
    fill = {"mean": 0.0, "max": -jnp.inf, "min": jnp.inf}[how]
    xb = jnp.pad(x, ((0, 0), (0, nb * block - T), (0, 0), (0, 0)), constant_values=fill).reshape(B, nb, block, H, K)
    if how == "max":
        return xb.max(axis=2)
    if how == "min":
        return xb.min(axis=2)
    count = jnp.minimum(T - jnp.arange(nb) * block, block).astype(jnp.float32)
    return xb.sum(axis=2) / count[None, :, None, None]


def density_k(n_blocks: int, density: float) -> int:
    """SeerAttention's nz_ratio rule: k = max(1, int((1 - sqrt(1 - r)) · nB)) key blocks per query block row."""
    return max(1, int((1.0 - math.sqrt(1.0 - density)) * n_blocks))


def k_table(n_blocks: int, *, top_k: int, density: float | None) -> np.ndarray:
    """int32 [n_blocks + 1]: the blocks per row for a call of nB = 0 ... n_blocks blocks (decoding indexes it with
    the traced number of blocks known so far)."""
    return np.array([top_k if density is None else density_k(max(n, 1), density) for n in range(n_blocks + 1)],
                    np.int32)


def _priority(scores, q_block_of_row, n_kv_blocks: int, sink_blocks: int):
    """(priority [B, Hs, R, nK] float32: +inf forced, the score for candidates, -inf otherwise; forced count [R];
    causal mask [R, nK] (J <= I))."""
    qb = jnp.asarray(q_block_of_row, jnp.int32)[:, None]  # I
    kb = jnp.arange(n_kv_blocks, dtype=jnp.int32)[None, :]  # J
    forced = (kb == qb) | ((kb < sink_blocks) & (kb <= qb))
    candidate = (kb < qb) & ~forced
    s = scores.astype(jnp.float32)
    priority = jnp.where(forced, jnp.inf, jnp.where(candidate, s, -jnp.inf))
    return priority, forced.sum(-1), kb <= qb


def topk_lists(
    scores: Float[Array, "B Hs R nK"],
    q_block_of_row: Int[Array, " R"],
    k,
    *,
    kmax: int,
    sink_blocks: int = 0,
) -> tuple[Int[Array, "B Hs R Kmax"], Int[Array, "B Hs R"]]:
    """Top-k lists: each row reads min(max(k, forced), I + 1) blocks (module docstring).

    Args:
      scores: a score per (row, key block); rows are query blocks (parallel form) or tokens (decoding).
      q_block_of_row: int [R], the query block I of each row.
      k: blocks per row, an int or a traced int32 scalar (decoding: a function of the blocks known so far).
      kmax: static list width, at least the largest count (the caller's bound on k, capped at nK).
    """
    n_kv = scores.shape[-1]
    kmax = max(1, min(kmax, n_kv))
    priority, n_forced, causal = _priority(scores, q_block_of_row, n_kv, sink_blocks)
    _, idx = jax.lax.top_k(priority, kmax)
    cnt = jnp.minimum(jnp.maximum(jnp.asarray(k, jnp.int32), n_forced), causal.sum(-1))
    cnt = jnp.minimum(cnt, kmax)
    return idx.astype(jnp.int32), jnp.broadcast_to(cnt, idx.shape[:-1]).astype(jnp.int32)


def threshold_lists(
    scores: Float[Array, "B Hs R nK"],
    q_block_of_row: Int[Array, " R"],
    threshold: float,
    *,
    sink_blocks: int = 0,
) -> tuple[Int[Array, "B Hs R nK"], Int[Array, "B Hs R"]]:
    """Threshold lists: the forced blocks and the candidates whose softmax over the row's causal blocks exceeds
    `threshold` (SeerAttention's inference threshold on softmax(S)); the lists are nK wide."""
    n_kv = scores.shape[-1]
    priority, _, causal = _priority(scores, q_block_of_row, n_kv, sink_blocks)
    probs = jax.nn.softmax(jnp.where(causal, scores.astype(jnp.float32), -jnp.inf), axis=-1)
    selected = (priority == jnp.inf) | ((priority > -jnp.inf) & (probs > threshold))
    _, idx = jax.lax.top_k(jnp.where(selected, priority, -jnp.inf), n_kv)
    return idx.astype(jnp.int32), selected.sum(-1).astype(jnp.int32)


def group_scores(q_pooled: Float[Array, "B nQ Hq K"], k_pooled: Float[Array, "B nK Hkv K"],
                 reduce: str = "max") -> Float[Array, "B Hkv nQ nK"]:
    """q_pooled · k_pooled per KV head, reduced ("max" or "mean") over the query heads of its GQA group, so that one
    list serves the group (the op then loads a K/V block once for the group)."""
    B, nQ, Hq, K = q_pooled.shape
    Hkv = k_pooled.shape[2]
    qg = q_pooled.astype(jnp.float32).reshape(B, nQ, Hkv, Hq // Hkv, K)
    s = jnp.einsum("BIHGK,BJHK->BHGIJ", qg, k_pooled.astype(jnp.float32))
    return s.max(axis=2) if reduce == "max" else s.mean(axis=2)
