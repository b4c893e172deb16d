"""Block-sparse softmax attention: the dense jnp oracle, and the exact merge of two attentions.

The op's contract (README.md in this folder): for batch b, query head h in list group g(h), query token i in query
block I = i // q_block and key token j in key block J = j // kv_block,

    visible(i, j) =  J ∈ {block_idx[b, g, I, c] : c < block_cnt[b, g, I]}
                   ∧ q_pos[i] ≥ 0 ∧ kv_pos[j] ≥ 0                                    (negative position = padding)
                   ∧ (¬causal ∨ kv_pos[j] ≤ q_pos[i])
                   ∧ (window is None ∨ q_pos[i] − kv_pos[j] < window[g] ∨ kv_pos[j] < n_sink[g])
                   ∧ (segments is None ∨ q_seg[i] = kv_seg[j])
    o_i = Σ_j softmax_{visible j}(scale · q_i·k_j) v_j,   lse_i = log Σ_{visible j} exp(scale · q_i·k_j)

and a row with no visible key gives o_i = 0, lse_i = −inf, with finite gradients. The list group of query head h is
g = 0 (Hs = 1, one list for all heads), h // (Hq / Hkv) (Hs = Hkv, one list per GQA group) or h (Hs = Hq).

This file builds the dense boolean mask [B, Hq, Tq, Tk] from the lists and the predicates: O(Tq · Tk) memory, the
readable truth every faster path is tested against. Autodiff is its backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


def group_of_heads(n_q_heads: int, n_kv_heads: int, n_groups: int) -> np.ndarray:
    """[Hq] list group of each query head (Hs = n_groups ∈ {1, Hkv, Hq})."""
    h = np.arange(n_q_heads)
    if n_groups == 1:
        return np.zeros_like(h)
    if n_groups == n_kv_heads:
        return h // (n_q_heads // n_kv_heads)
    if n_groups == n_q_heads:
        return h
    raise ValueError(f"block_idx has {n_groups} list groups; expected 1, n_kv_heads={n_kv_heads} or "
                     f"n_q_heads={n_q_heads}")


def per_group(value, n_groups: int, name: str, *, missing: int) -> Int[Array, " Hs"]:
    """An int or a per-group sequence/array (window, n_sink) as an int32 [Hs] vector; None means `missing`."""
    if value is None:
        return jnp.full((n_groups,), missing, jnp.int32)
    arr = jnp.asarray(value, jnp.int32)
    if arr.ndim == 0:
        return jnp.full((n_groups,), arr, jnp.int32)
    if arr.shape != (n_groups,):
        raise ValueError(f"{name} must be an int or have one entry per list group ({n_groups}), got shape {arr.shape}")
    return arr


def selected_blocks(
    block_idx: Int[Array, "B Hs nQb Kmax"], block_cnt: Int[Array, "B Hs nQb"], n_kv_blocks: int
) -> Bool[Array, "B Hs nQb nKb"]:
    """Dense [.., nQb, nKb] block mask of the lists: entries c >= block_cnt (and ids outside [0, nKb)) are ignored."""
    used = jnp.arange(block_idx.shape[-1])[None, None, None, :] < block_cnt[..., None]
    ids = jnp.where(used, block_idx, -1)  # one_hot of -1 is all zeros
    return jnp.any(jax.nn.one_hot(ids, n_kv_blocks, dtype=jnp.bool_), axis=-2)


def _positions(pos, batch: int, length: int) -> Int[Array, "B L"]:
    if pos is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, length))


def visible_mask(
    block_idx: Int[Array, "B Hs nQb Kmax"],
    block_cnt: Int[Array, "B Hs nQb"],
    *,
    n_q_heads: int,
    n_kv_heads: int,
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    causal: bool = True,
    window=None,
    n_sink=None,
    q_pos=None,
    kv_pos=None,
    segment_ids=None,
) -> Bool[Array, "B Hq Tq Tk"]:
    """visible(i, j) of the module docstring for every query head, as a dense boolean array."""
    B, Hs = block_idx.shape[:2]
    n_kv_blocks = -(-kv_len // kv_block)
    groups = group_of_heads(n_q_heads, n_kv_heads, Hs)

    blocks_BGIJ = selected_blocks(block_idx, block_cnt, n_kv_blocks)
    qb, kb = np.arange(q_len) // q_block, np.arange(kv_len) // kv_block
    vis_BGTS = blocks_BGIJ[:, :, qb][:, :, :, kb]

    qp, kp = _positions(q_pos, B, q_len), _positions(kv_pos, B, kv_len)
    vis_BGTS &= ((qp[:, :, None] >= 0) & (kp[:, None, :] >= 0))[:, None]
    if causal:
        vis_BGTS &= (kp[:, None, :] <= qp[:, :, None])[:, None]
    if window is not None:
        w = per_group(window, Hs, "window", missing=np.iinfo(np.int32).max)
        sink = per_group(n_sink, Hs, "n_sink", missing=0)
        offset_BTS = qp[:, :, None] - kp[:, None, :]
        in_window = offset_BTS[:, None] < w[None, :, None, None]
        is_sink = kp[:, None, None, :] < sink[None, :, None, None]
        vis_BGTS &= in_window | is_sink
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        vis_BGTS &= (jnp.asarray(q_seg)[:, :, None] == jnp.asarray(kv_seg)[:, None, :])[:, None]
    return vis_BGTS[:, groups]


def masked_softmax(s: Float[Array, "*R S"], mask) -> tuple[Float[Array, "*R S"], Float[Array, " *R"]]:
    """Softmax of float32 logits s over the last axis where `mask` (broadcast to s) holds: (p, lse). Masked logits
    become -inf, so exp gives exactly 0 with a zero gradient; an empty row's max is replaced by 0 and its sum by 1
    before dividing or taking the log (the double-where rule), so it gives p = 0, lse = -inf and no NaN reaches the
    gradient."""
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    nonempty = denom > 0
    safe = jnp.where(nonempty, denom, 1.0)
    return p / safe, jnp.where(nonempty, m + jnp.log(safe), -jnp.inf)[..., 0]


def block_sparse_reference(
    q: Float[Array, "B Tq Hq D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv Dv"],
    block_idx: Int[Array, "B Hs nQb Kmax"],
    block_cnt: Int[Array, "B Hs nQb"],
    *,
    q_block: int,
    kv_block: int,
    causal: bool = True,
    window=None,
    n_sink=None,
    q_pos=None,
    kv_pos=None,
    segment_ids=None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Masked softmax over the visible keys of each query; float32 inside, output in q's dtype, lse float32.

    Returns o [B, Tq, Hq, Dv] (and lse [B, Tq, Hq] when return_lse).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    mask_BHTS = visible_mask(block_idx, block_cnt, n_q_heads=Hq, n_kv_heads=Hkv, q_len=Tq, kv_len=Tk,
                             q_block=q_block, kv_block=kv_block, causal=causal, window=window, n_sink=n_sink,
                             q_pos=q_pos, kv_pos=kv_pos, segment_ids=segment_ids)

    q_BTHGD = q.reshape(B, Tq, Hkv, G, D)
    s_BHGTS = jnp.einsum("BTHGD,BSHD->BHGTS", q_BTHGD, k, preferred_element_type=jnp.float32) * scale
    s_BHTS = s_BHGTS.reshape(B, Hq, Tq, Tk)

    p_BHTS, lse_BHT = masked_softmax(s_BHTS, mask_BHTS)
    o_BHTV = jnp.einsum("BHTS,BSHV->BHTV", p_BHTS,
                        jnp.repeat(v.astype(jnp.float32), G, axis=2).reshape(B, Tk, Hq, -1))
    o = jnp.transpose(o_BHTV, (0, 2, 1, 3)).astype(q.dtype)
    if not return_lse:
        return o
    return o, jnp.transpose(lse_BHT, (0, 2, 1))


def merge_attention(
    o1: Float[Array, "*L Dv"], lse1: Float[Array, "*L"], o2: Float[Array, "*L Dv"], lse2: Float[Array, "*L"]
) -> tuple[Float[Array, "*L Dv"], Float[Array, "*L"]]:
    """Attention of the same queries over the union of two *disjoint* key sets, from each set's (o, lse).

    Any leading shape L: [B, T, H] rows of `block_sparse_attention`, [B, H] of `sparse_decode_attention`.

    lse = log(e^lse1 + e^lse2), o = e^(lse1 − lse) o1 + e^(lse2 − lse) o2. Exact for disjoint sets only (overlapping
    sets count the shared keys twice). Rows empty in both give o = 0, lse = −inf, with finite gradients; adding
    log w to one lse weights that part by w (importance weights).
    """
    m = jax.lax.stop_gradient(jnp.maximum(lse1, lse2))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)  # exp(-inf) = 0, gradient 0
    s = w1 + w2
    nonempty = s > 0
    s_safe = jnp.where(nonempty, s, 1.0)
    o = (w1[..., None] * o1.astype(jnp.float32) + w2[..., None] * o2.astype(jnp.float32)) / s_safe[..., None]
    lse = jnp.where(nonempty, m + jnp.log(s_safe), -jnp.inf)
    return o.astype(o1.dtype), lse
