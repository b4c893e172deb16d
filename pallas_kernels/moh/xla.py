"""Mixture-of-head attention in plain XLA: a dense path (every head, zero gates) and a sparse path in which only the
active (token, head) pairs pay for the attention scores, the attention output and the output projection.

Sparse path (derivation in README.md). The M = B·T·A active pairs are grouped by (batch row, head), the unit that
shares one K/V head and one slice W_O^h of the output projection. Each group is padded to a multiple of the block
size C and cut into blocks of C pairs, so every block belongs to exactly one group (the grouped-matmul layout of
MegaBlocks, arXiv 2211.15841). A block gathers its C queries, its group's K and V heads [S, K] and W_O^h [V, D],
and computes C rows of attention and projection; the rows are then scatter-added into their tokens. The number of
blocks has the static bound (M + min(G, M)·(C - 1)) // C for G = B·H groups, so the shapes are fixed under jit.
Work is O((M + G·C)·S·(K + V) + (M + G·C)·V·D) instead of O(B·T·H·S·(K + V) + B·T·H·V·D) for the dense path.

`jax.lax.ragged_dot` would express the grouped matmuls, but on CPU (jax 0.12) it lowers to a dense dot over every
group (16x the FLOPs of the dense matmul at 16 groups, measured), so the blocks are laid out here instead.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.attention import dot_product_attention
from effarch.pallas_kernels.moh.reference import causal_mask, dense_head_gates


def dense_gated(q, k, v, heads, gates, w_o, *, q_positions, attention_implementation=None):
    """Every head through `dot_product_attention`, then the dense [B, T, H] gate and the full projection."""
    B, T, H = q.shape[:3]
    mask = None if q_positions is None else causal_mask(q_positions, B, k.shape[1])
    o_BTHV = dot_product_attention(q, k, v, causal=q_positions is None, mask=mask,
                                   implementation=attention_implementation)
    g_BTH = dense_head_gates(heads, gates, H).astype(o_BTHV.dtype)
    return jnp.einsum("BTHV,BTH,HVD->BTD", o_BTHV, g_BTH, w_o.astype(o_BTHV.dtype)).astype(q.dtype)


def num_blocks(n_pairs: int, n_groups: int, block_size: int) -> int:
    """Static upper bound on Σ_g ceil(n_g / C) over groups with Σ_g n_g = n_pairs."""
    return (n_pairs + min(n_groups, n_pairs) * (block_size - 1)) // block_size


def sparse_pairs(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hkv K"],
    v: Float[Array, "B S Hkv V"],
    heads: Int[Array, "B T A"],
    gates: Float[Array, "B T A"],
    w_o: Float[Array, "H V D"],
    *,
    q_positions: Int[Array, " T"] | None,
    block_size: int,
) -> Float[Array, "B T D"]:
    """Only the active (token, head) pairs are computed; same result as the reference (see module docstring)."""
    B, T, H, K = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    A, D = heads.shape[-1], w_o.shape[-1]
    C = max(1, min(block_size, T))
    M, G = B * T * A, B * H
    N = num_blocks(M, G, C)
    positions_T = jnp.arange(T, dtype=jnp.int32) if q_positions is None else q_positions.astype(jnp.int32)

    # Pair m = (b, t, a) in row-major order; its group is (b, head).
    heads_M = heads.reshape(M).astype(jnp.int32)
    batch_M = jnp.repeat(jnp.arange(B, dtype=jnp.int32), T * A)
    token_M = jnp.repeat(jnp.arange(B * T, dtype=jnp.int32), A)
    group_M = batch_M * H + heads_M

    # Sort the pairs by group (stable: within a group they stay in time order) and give each a padded slot.
    order = jnp.argsort(group_M, stable=True)
    group_sorted = group_M[order]
    count_G = jnp.bincount(group_M, length=G)
    group_start_G = jnp.cumsum(count_G) - count_G
    blocks_G = (count_G + C - 1) // C
    block_end_G = jnp.cumsum(blocks_G)
    block_start_G = block_end_G - blocks_G
    rank = jnp.arange(M, dtype=jnp.int32) - group_start_G[group_sorted]
    slot = block_start_G[group_sorted] * C + rank
    # Slots left empty point at pair M, an extra all-zero row whose gate is 0.
    slot_pair = jnp.full((N * C,), M, jnp.int32).at[slot].set(order.astype(jnp.int32))
    block_group_N = jnp.minimum(jnp.searchsorted(block_end_G, jnp.arange(N), side="right"), G - 1)

    def rows(x_M, fill):
        return jnp.concatenate([x_M, jnp.full((1, *x_M.shape[1:]), fill, x_M.dtype)])[slot_pair]

    q_M = jnp.take_along_axis(q, heads[..., None].astype(jnp.int32), axis=2).reshape(M, K)
    q_NCK = rows(q_M, 0).reshape(N, C, K)
    g_NC = rows(gates.reshape(M), 0).reshape(N, C)
    pos_NC = rows(jnp.broadcast_to(positions_T[None, :, None], (B, T, A)).reshape(M), 0).reshape(N, C)
    token_NC = rows(token_M, B * T).reshape(N, C)

    batch_N, head_N = block_group_N // H, block_group_N % H
    kv_N = head_N // (H // Hkv)
    k_NSK = k[batch_N, :, kv_N]
    v_NSV = v[batch_N, :, kv_N]
    w_NVD = w_o[head_N]

    logits_NCS = jnp.einsum("NCK,NSK->NCS", q_NCK, k_NSK, preferred_element_type=jnp.float32) * K**-0.5
    visible_NCS = jnp.arange(S)[None, None, :] <= pos_NC[..., None]
    # Key 0 is visible to every query (positions >= 0), so no row is empty and the softmax is finite.
    probs_NCS = jax.nn.softmax(jnp.where(visible_NCS, logits_NCS, -jnp.inf), axis=-1)
    o_NCV = jnp.einsum("NCS,NSV->NCV", probs_NCS, v_NSV.astype(jnp.float32))
    o_NCV = o_NCV * g_NC[..., None].astype(jnp.float32)
    y_NCD = jnp.einsum("NCV,NVD->NCD", o_NCV, w_NVD.astype(jnp.float32))
    y_TD = jnp.zeros((B * T + 1, D), jnp.float32).at[token_NC.reshape(N * C)].add(y_NCD.reshape(N * C, D))
    return y_TD[: B * T].reshape(B, T, D).astype(q.dtype)
