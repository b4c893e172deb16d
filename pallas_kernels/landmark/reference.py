"""Landmark grouped-softmax attention, dense masked form: the readable oracle (materialises [B, H, T, T]).

Paper: Mohtashami & Jaggi, arXiv 2305.16300, §3. Reference: epfml/landmark-attention,
lm_benchmark/models/landmark.py (`LandmarkGroupedSoftmaxFunction`, the mask code of `CausalSelfAttention.forward`).
Conventions and their derivation: README.md.

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
    k: Float[Array, "B S H K"],
    is_landmark: Bool[Array, "B S"],
    q_positions: Int[Array, " T"] | None = None,
) -> Float[Array, "B H T S"]:
    """The attention weights w_ij of the grouped softmax (rows sum to 1, or less for an empty-block landmark).

    Args:
      q, k: already rotated (RoPE is the layer's job); scale 1/sqrt(K).
      is_landmark: [B, S], True where the key is a landmark.
      q_positions: the key position of each query, [T]; None means arange(T) (self attention, S = T). A query at
        position p sees keys <= p, and its block is block(p) of the keys (decoding against a cache).

    Returns:
      [B, H, T, S] in float32; zero on landmark columns, on the future and on a query with nothing to see.
    """
    scale = q.shape[-1] ** -0.5
    s_BHTS = jnp.einsum("bthk,bshk->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return grouped_softmax(s_BHTS, is_landmark, q_positions)[0]


def grouped_softmax(
    s_BHTS: Float[Array, "B H T S"],
    is_landmark: Bool[Array, "B S"],
    q_positions: Int[Array, " T"] | None = None,
    mem_s: Float[Array, "B H T M N"] | None = None,
    mem_valid: Bool[Array, "B H T M"] | None = None,
    key_valid: Bool[Array, "B S"] | None = None,
) -> tuple[Float[Array, "B H T S"], Float[Array, "B H T M N"] | None]:
    """Grouped-softmax weights from scores: local keys by the landmark rules, plus optional retrieved blocks.

    Args:
      s_BHTS: scaled scores of the local keys.
      is_landmark, q_positions: as in `landmark_weights`.
      mem_s: scores of M extra complete blocks per (query, head) (retrieved from a block memory): N = L + 1 keys,
        the last one the block's landmark. Each is one more group of the top-level softmax, like an earlier block.
      mem_valid: which of the M blocks exist (False for an empty memory slot).
      key_valid: local keys that exist (False for an unwritten slot); None means all.

    Returns:
      (local weights [B, H, T, S], memory weights [B, H, T, M, N] or None); landmark columns are 0.
    """
    T, S = s_BHTS.shape[2:]
    if q_positions is None:
        q_positions = jnp.arange(T)
    valid_BS = jnp.ones_like(is_landmark) if key_valid is None else key_valid
    lm_BS = is_landmark & valid_BS
    reg_BS = ~is_landmark & valid_BS
    blk_BS = block_ids(is_landmark)
    blk_BT = blk_BS[:, q_positions]
    same_block = blk_BT[:, None, :, None] == blk_BS[:, None, None, :]
    earlier_block = blk_BS[:, None, None, :] < blk_BT[:, None, :, None]
    causal = (jnp.arange(S)[None, :] <= q_positions[:, None])[None, None]
    cur = reg_BS[:, None, None, :] & same_block & causal
    lm = lm_BS[:, None, None, :] & earlier_block
    grp = reg_BS[:, None, None, :] & earlier_block

    # Top level: log Z_i over Cur(i) and Lm(i); -inf for an empty row. Double where: no NaN gradient from -inf.
    top = cur | lm
    top_logits = jnp.where(top, s_BHTS, -jnp.inf)
    has_top = jnp.any(top, axis=-1, keepdims=True)
    if mem_s is not None:
        mem_top = jnp.where(mem_valid, mem_s[..., -1], -jnp.inf)
        top_logits = jnp.concatenate([top_logits, mem_top], axis=-1)
        has_top = has_top | jnp.any(mem_valid, axis=-1, keepdims=True)
    log_z = jax.nn.logsumexp(jnp.where(has_top, top_logits, 0.0), axis=-1, keepdims=True)
    log_z = jnp.where(has_top, log_z, 0.0)

    # Within-group log normaliser per (query, group); groups are the block ids, at most S of them.
    n_groups = S
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
    w = w + jnp.where(grp, jnp.exp(jnp.where(grp, log_w_grp, 0.0)), 0.0)
    if mem_s is None:
        return w, None
    # A retrieved block: its landmark's share of Z, split by the softmax over its L regular keys.
    mem_lse = jax.nn.logsumexp(mem_s[..., :-1], axis=-1, keepdims=True)
    log_w_mem = mem_s[..., -1:] - log_z[..., None] + mem_s[..., :-1] - mem_lse
    valid = mem_valid[..., None]
    w_mem = jnp.where(valid, jnp.exp(jnp.where(valid, log_w_mem, 0.0)), 0.0)
    return w, jnp.concatenate([w_mem, jnp.zeros_like(mem_s[..., -1:])], axis=-1)




def landmark_attention_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S H K"],
    v: Float[Array, "B S H V"],
    is_landmark: Bool[Array, "B S"],
    q_positions: Int[Array, " T"] | None = None,
) -> Float[Array, "B T H V"]:
    """out_i = sum_j w_ij v_j with the weights of `landmark_weights`; in v's dtype (computed in float32)."""
    w_BHTS = landmark_weights(q, k, is_landmark, q_positions)
    return jnp.einsum("bhts,bshv->bthv", w_BHTS, v.astype(jnp.float32)).astype(v.dtype)
