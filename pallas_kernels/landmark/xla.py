"""Landmark grouped-softmax attention, blockwise in plain JAX: one [H, C, C] tile of scores alive at a time.

Paper: arXiv 2305.16300 §3; the derivation of this single-pass form is in README.md ("Blockwise form").

The grouped softmax is one online softmax whose entries are the current-block keys (value v_j) and the landmarks
of earlier blocks (value o_ig, the within-group softmax attention of the block the landmark closes):

    out_i = [sum_{Cur} e^{S_ij} v_j + sum_{g < c} e^{S_i,l_g} o_ig] / Z_i,   o_ig = sum_{j in g} softmax_g(S_i.)_j v_j

Keys are scanned in tiles of C. Within a tile the groups are segments of consecutive regular keys (a landmark ends
one), so their running max / sum come from a segment max and a one-hot matmul over at most C segments. The group
still open at the end of a tile is carried into the next one (m, l, acc), like the top-level (m, l, acc) of
flash attention. Nothing bounds the number of groups: only the C segments of one tile exist at a time.

Every max is a stop-gradient shift (the result does not depend on it), and every exp / divide of a masked entry
sits behind a double `where`, so fully masked rows, empty groups and padded keys give 0 and finite gradients.
Each query tile and each key-tile step is rematerialised in the backward pass, so autodiff keeps the carries of
one query tile at a time, O(T V), never the scores.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from effarch.pallas_kernels.landmark.reference import block_ids

NEG_INF = -jnp.inf


def _finite_or_zero(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _key_tile(carry, tile, *, q_TK, blk_T, pos_T, scale):
    """Adds one tile of C keys to the running state of one query tile (one batch element, all heads)."""
    m_top, l_top, acc_top, m_open, l_open, acc_open = carry
    k_SHK, v_SHV, lm_S, blk_S, pos_S = tile
    C = lm_S.shape[0]
    s_HTS = jnp.einsum("thk,shk->hts", q_TK, k_SHK) * scale
    reg_S = ~lm_S
    # Local segment of each key: 0 is the group open at the tile start (the carried one).
    seg_S = blk_S - blk_S[0]

    # Within-group running max per segment, merged with the carried open group at segment 0.
    s_reg = jnp.where(reg_S[None, None], s_HTS, NEG_INF)
    m_seg = jnp.moveaxis(jax.ops.segment_max(jnp.moveaxis(s_reg, -1, 0), seg_S, num_segments=C), 0, -1)
    m_seg = jax.lax.stop_gradient(m_seg.at[..., 0].max(m_open))
    m_seg_safe = _finite_or_zero(m_seg)
    p_HTS = jnp.where(reg_S[None, None], jnp.exp(jnp.where(reg_S[None, None], s_HTS - m_seg_safe[..., seg_S], 0.0)),
                      0.0)
    open_scale = jnp.where(jnp.isfinite(m_open), jnp.exp(_finite_or_zero(m_open) - m_seg_safe[..., 0]), 0.0)
    onehot_SM = jax.nn.one_hot(seg_S, C, dtype=s_HTS.dtype)
    l_seg = jnp.einsum("hts,sm->htm", p_HTS, onehot_SM).at[..., 0].add(open_scale * l_open)

    # Top level: current-block keys and the landmarks of earlier blocks.
    cur_TS = reg_S[None] & (blk_S[None] == blk_T[:, None]) & (pos_S[None] <= pos_T[:, None])
    lm_TS = lm_S[None] & (blk_S[None] < blk_T[:, None])
    top_TS = cur_TS | lm_TS
    m_tile = jnp.max(jnp.where(top_TS[None], s_HTS, NEG_INF), axis=-1)
    m_new = jax.lax.stop_gradient(jnp.maximum(m_top, m_tile))
    m_new_safe = _finite_or_zero(m_new)
    pt_HTS = jnp.where(top_TS[None], jnp.exp(jnp.where(top_TS[None], s_HTS - m_new_safe[..., None], 0.0)), 0.0)
    alpha = jnp.where(jnp.isfinite(m_top), jnp.exp(_finite_or_zero(m_top) - m_new_safe), 0.0)
    l_top = alpha * l_top + jnp.sum(pt_HTS, axis=-1)

    # A landmark passes its top-level weight to its group's keys: factor_m = p(l_m) / l_m, value o = acc_m / l_m.
    w_lm = jnp.einsum("hts,sm->htm", jnp.where(lm_TS[None], pt_HTS, 0.0), onehot_SM)
    has_keys = l_seg > 0
    factor = jnp.where(has_keys, w_lm / jnp.where(has_keys, l_seg, 1.0), 0.0)
    w_key = jnp.where(cur_TS[None], pt_HTS, 0.0) + p_HTS * factor[..., seg_S]
    acc_top = (
        alpha[..., None] * acc_top
        + jnp.einsum("hts,shv->htv", w_key, v_SHV)
        + (factor[..., 0] * open_scale)[..., None] * acc_open
    )

    # The group open after this tile: the last segment, unless the tile ends with a landmark.
    last_open = ~lm_S[-1]
    last_seg = seg_S[-1]
    in_last = (seg_S == last_seg) & reg_S
    acc_last = jnp.einsum("hts,shv->htv", jnp.where(in_last[None, None], p_HTS, 0.0), v_SHV)
    acc_last = acc_last + jnp.where(last_seg == 0, open_scale, 0.0)[..., None] * acc_open
    m_open = jnp.where(last_open, m_seg[..., last_seg], NEG_INF)
    l_open = jnp.where(last_open, l_seg[..., last_seg], 0.0)
    acc_open = jnp.where(last_open, acc_last, 0.0)
    return (m_new, l_top, acc_top, m_open, l_open, acc_open), None


def _one_sequence(q_THK, k_THK, v_THV, lm_T, *, block_size: int):
    T, H, K = q_THK.shape
    V = v_THV.shape[-1]
    C = block_size
    N = -(-T // C)
    pad = N * C - T
    # Padded keys are regular tokens after every real one: causally hidden, and their open group never closes.
    q_THK, k_THK, v_THV = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q_THK, k_THK, v_THV))
    lm_T = jnp.pad(lm_T, (0, pad))
    blk_T = block_ids(lm_T[None])[0]
    pos_T = jnp.arange(N * C)
    tiles = (
        k_THK.reshape(N, C, H, K),
        v_THV.reshape(N, C, H, V),
        lm_T.reshape(N, C),
        blk_T.reshape(N, C),
        pos_T.reshape(N, C),
    )

    def query_tile(args):
        q_CHK, blk_C, pos_C = args
        body = jax.checkpoint(functools.partial(_key_tile, q_TK=q_CHK, blk_T=blk_C, pos_T=pos_C, scale=K**-0.5))
        zeros_HC = jnp.zeros((H, C), jnp.float32)
        neg_HC = jnp.full((H, C), NEG_INF, jnp.float32)
        zeros_HCV = jnp.zeros((H, C, V), jnp.float32)
        init = (neg_HC, zeros_HC, zeros_HCV, neg_HC, zeros_HC, zeros_HCV)
        (_, l_top, acc_top, *_), _ = jax.lax.scan(body, init, tiles)
        has = l_top > 0
        out_HCV = jnp.where(has[..., None], acc_top / jnp.where(has, l_top, 1.0)[..., None], 0.0)
        return jnp.moveaxis(out_HCV, 0, 1)

    # Rematerialising the whole query tile too keeps the backward's stored carries to one query tile, O(T V)
    # instead of O(T^2 V / C) for all of them.
    out = jax.lax.map(jax.checkpoint(query_tile), (q_THK.reshape(N, C, H, K), blk_T.reshape(N, C), pos_T.reshape(N, C)))
    return out.reshape(N * C, H, V)[:T]


def landmark_attention_xla(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    is_landmark: Bool[Array, "B T"],
    *,
    block_size: int = 64,
) -> Float[Array, "B T H V"]:
    """Grouped-softmax landmark attention in tiles of `block_size` queries x keys; see the module docstring.

    Returns [B, T, H, V] in v's dtype (accumulated in float32). A tile larger than T is capped at T.
    """
    T = q.shape[1]
    C = max(1, min(block_size, T))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    fn = functools.partial(_one_sequence, block_size=C)
    return jax.vmap(fn)(f32(q), f32(k), f32(v), is_landmark).astype(v.dtype)
