"""Landmark grouped-softmax attention, dense masked form: the readable oracle (materialises [B, H, T, T]).

Paper: Mohtashami & Jaggi, arXiv 2305.16300, §3. Reference: epfml/landmark-attention,
lm_benchmark/models/landmark.py (`LandmarkGroupedSoftmaxFunction`, the mask code of `CausalSelfAttention.forward`).
Conventions: specs/mechanisms.md §4.2 and issue 7; the derivation is in README.md.

For query i in block c = block(i) (block(j) = number of landmarks strictly before j):

    Cur(i) = {j <= i regular, block(j) = c}            Lm(i) = {landmarks j, block(j) < c}  (= landmarks j < i)
    Z_i    = sum_{Cur} e^{S_ij} + sum_{Lm} e^{S_il}
    w_ij   = e^{S_ij} / Z_i                                         j in Cur(i)
    w_ij   = e^{S_i,l_g} / Z_i * e^{S_ij} / sum_{j' regular in g} e^{S_ij'}   j regular in an earlier block g
    w_ij   = 0                                                      j a landmark

Unlike the reference code there is no cap on the number of groups (its `max_groups_for_softmax` overflows
silently): the group axis here is as long as the sequence.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def block_ids(is_landmark: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """block(j) = number of landmarks strictly before j (cumsum(is_mem) - is_mem in the reference code)."""
    lm = is_landmark.astype(jnp.int32)
    return jnp.cumsum(lm, axis=-1) - lm


def _group_max(s_BHTS, group_BS, valid_BS, n_groups: int):
    """max over the keys of each group, [B, H, T, G]; -inf for a group with no valid key."""

    def one(s_HTS, group_S, valid_S):
        data_SHT = jnp.moveaxis(jnp.where(valid_S[None, None], s_HTS, -jnp.inf), -1, 0)
        return jnp.moveaxis(jax.ops.segment_max(data_SHT, group_S, num_segments=n_groups), 0, -1)

    return jax.vmap(one)(s_BHTS, group_BS, valid_BS)


def landmark_weights(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    is_landmark: Bool[Array, "B T"],
) -> Float[Array, "B H T S"]:
    """The attention weights w_ij of the grouped softmax (rows sum to 1, or less for an empty-block landmark).

    Args:
      q, k: already rotated (RoPE is the layer's job); scale 1/sqrt(K).
      is_landmark: [B, T], True where the token is a landmark.

    Returns:
      [B, H, T, S] in float32, S = T; zero on landmark columns, on the future and on a query with nothing to see.
    """
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5
    s_BHTS = jnp.einsum("bthk,bshk->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    lm_BS = is_landmark
    reg_BS = ~is_landmark
    blk_BS = block_ids(is_landmark)
    same_block = blk_BS[:, None, :, None] == blk_BS[:, None, None, :]
    earlier_block = blk_BS[:, None, None, :] < blk_BS[:, None, :, None]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
    cur = reg_BS[:, None, None, :] & same_block & causal
    lm = lm_BS[:, None, None, :] & earlier_block
    grp = reg_BS[:, None, None, :] & earlier_block

    # Top level: log Z_i over Cur(i) and Lm(i); -inf for an empty row. Double where: no NaN gradient from -inf.
    top = cur | lm
    has_top = jnp.any(top, axis=-1, keepdims=True)
    log_z = jax.nn.logsumexp(jnp.where(top, s_BHTS, -jnp.inf), axis=-1, keepdims=True)
    log_z = jnp.where(has_top, log_z, 0.0)

    # Within-group log normaliser per (query, group); groups are the block ids, at most T of them.
    n_groups = T
    g_max = jax.lax.stop_gradient(_group_max(s_BHTS, blk_BS, reg_BS, n_groups))
    g_max = jnp.where(jnp.isfinite(g_max), g_max, 0.0)
    onehot_BSG = jax.nn.one_hot(blk_BS, n_groups, dtype=jnp.float32) * reg_BS[..., None]
    g_max_key = jnp.take_along_axis(g_max, jnp.broadcast_to(blk_BS[:, None, None, :], s_BHTS.shape), axis=-1)
    e_BHTS = jnp.where(reg_BS[:, None, None, :], jnp.exp(jnp.where(reg_BS[:, None, None, :], s_BHTS - g_max_key, 0.0)),
                       0.0)
    g_sum = jnp.einsum("bhts,bsg->bhtg", e_BHTS, onehot_BSG)
    g_lse = jnp.log(jnp.where(g_sum > 0, g_sum, 1.0)) + g_max

    # Score of the landmark closing group g, [B, H, T, G] (each group has at most one landmark).
    lm_onehot_BSG = jax.nn.one_hot(blk_BS, n_groups, dtype=jnp.float32) * lm_BS[..., None]
    lm_score = jnp.einsum("bhts,bsg->bhtg", s_BHTS, lm_onehot_BSG)

    def per_key(x_BHTG):
        return jnp.take_along_axis(x_BHTG, jnp.broadcast_to(blk_BS[:, None, None, :], s_BHTS.shape), axis=-1)

    log_w_cur = s_BHTS - log_z
    log_w_grp = per_key(lm_score) - log_z + s_BHTS - per_key(g_lse)
    w = jnp.where(cur, jnp.exp(jnp.where(cur, log_w_cur, 0.0)), 0.0)
    return w + jnp.where(grp, jnp.exp(jnp.where(grp, log_w_grp, 0.0)), 0.0)


def landmark_attention_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    is_landmark: Bool[Array, "B T"],
) -> Float[Array, "B T H V"]:
    """out_i = sum_j w_ij v_j with the weights of `landmark_weights`; in v's dtype (computed in float32)."""
    w_BHTS = landmark_weights(q, k, is_landmark)
    return jnp.einsum("bhts,bshv->bthv", w_BHTS, v.astype(jnp.float32)).astype(v.dtype)
