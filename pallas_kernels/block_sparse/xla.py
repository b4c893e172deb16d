"""Block-sparse softmax attention in plain XLA: gathers only the listed key blocks, O(Tq · Kmax · kv_block) memory.

The contract is reference.py's (README.md in this folder). For every query block I and list entry c, the key block
J = block_idx[b, g, I, c] is gathered whole (K, V, positions, segments: `kv_block` contiguous tokens, so the gather and
its transpose, the scatter-add of dK/dV, move blocks rather than single tokens). The scores of query block I are then
[q_block, Kmax · kv_block]; entries c >= block_cnt, and ids outside [0, nKb), are masked, and the token predicates
(padding, causal, window / sinks per group, segments) are evaluated on the gathered positions. Nothing of size
[Tq, Tk] is ever built.

Heads: with Hs = 1 or Hkv one gathered K/V block serves the Hq / Hkv query heads of a KV head (Hs = 1 broadcasts the
list over the KV heads); with Hs = Hq each query head gathers its own blocks (Hq / Hkv times the bytes).

Memory: the query blocks are processed `q_blocks_per_step` at a time under `lax.map`, and the per-step computation
(gather, scores, softmax, contraction) is wrapped in `jax.checkpoint`, so the backward saves only each step's inputs
and recomputes the scores: the live score buffers are [B, Hq, q_blocks_per_step, q_block, Kmax · kv_block], the
saved residuals O(Tq · D). The softmax is the reference's double-where form (masked logits -inf, an empty row's max
replaced by 0 and its sum by 1), so an empty row gives o = 0, lse = -inf and zero, finite gradients.

Precision: scores and the probability-value contraction accumulate in float32; bf16 inputs stay bf16 in the gathers
(the probabilities are cast to v's dtype for the contraction, as flash attention kernels do).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse.reference import group_of_heads, per_group

# Default bound on one step's float32 score buffer [B, Hq, steps' query blocks, q_block, Kmax · kv_block], in bytes.
# A step's forward + backward keeps about 7 buffers of that size live (scores, probabilities, mask, their cotangents,
# gathered K/V and theirs). On a 2-core CPU (fwd + bwd, T = 8k, H = 4, D = 64, 10% of blocks) 4 to 128 query blocks per
# step timed alike within the load noise while the compiled temporaries grew from 66 MiB to 682 MiB: the bound is small.
STEP_SCORE_BYTES = 1 << 22


def _pad_axis1(x, length: int, value):
    """x [B, T, ...] padded with `value` along axis 1 to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _positions(pos, batch: int, length: int, padded: int) -> Int[Array, "B Tp"]:
    """Positions [B, padded]: arange (or the given [B, T] / [T]) then -1 (padding, never visible)."""
    if pos is None:
        pos = jnp.arange(length, dtype=jnp.int32)
    pos = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, length))
    return _pad_axis1(pos, padded, -1)


def _steps(x, n_steps: int, axis: int):
    """Splits `axis` (n_steps · per_step long) and moves the step axis first, for lax.map."""
    shape = x.shape[:axis] + (n_steps, x.shape[axis] // n_steps) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def block_sparse_xla(
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
    q_blocks_per_step: int | None = None,
    remat: bool = True,
):
    """Gathered-block attention (module docstring); arguments as `block_sparse_attention`, plus:

    Args:
      q_blocks_per_step: query blocks computed together in one `lax.map` step (static); None takes the fewest
        steps whose float32 scores fit STEP_SCORE_BYTES, split evenly. nQb is padded up to a multiple (the padded
        blocks have empty lists).
      remat: `jax.checkpoint` each step, so the backward recomputes the scores instead of saving them.

    Returns:
      o [B, Tq, Hq, Dv] in q's dtype (and lse [B, Tq, Hq] float32, -inf on empty rows, when return_lse).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    Hs, n_q_blocks, kmax = block_idx.shape[1], block_idx.shape[2], block_idx.shape[3]
    G = Hq // Hkv
    n_kv_blocks = -(-Tk // kv_block)
    scale = D**-0.5 if scale is None else scale
    group_of_heads(Hq, Hkv, Hs)  # validates Hs
    # The list layout [B, Hl, Gs, nQb, Kmax]: Hl list heads (1 or Hkv), Gs lists per KV head (1, or G when per
    # query head). Query head h = kv · G + gi, so Hs = Hq reshapes to [Hkv, G].
    per_q_head = Hs == Hq and Hs != Hkv
    Hl, Gs = (Hkv, G) if per_q_head else (Hs, 1)
    span = kmax * kv_block

    if q_blocks_per_step is None:
        per_block = B * Hq * q_block * span * 4
        most = int(np.clip(STEP_SCORE_BYTES // max(per_block, 1), 1, n_q_blocks))
        q_blocks_per_step = -(-n_q_blocks // -(-n_q_blocks // most))  # equal steps: the least padding
    if q_blocks_per_step < 1:
        raise ValueError(f"q_blocks_per_step must be positive, got {q_blocks_per_step}")
    n_steps = -(-n_q_blocks // q_blocks_per_step)
    nqb_pad = n_steps * q_blocks_per_step
    tq_pad, tk_pad = nqb_pad * q_block, n_kv_blocks * kv_block

    # Lists: unused or out-of-range entries are masked and their ids clamped (the gather reads a harmless block).
    idx = jnp.asarray(block_idx, jnp.int32).reshape(B, Hl, Gs, n_q_blocks, kmax)
    cnt = jnp.asarray(block_cnt, jnp.int32).reshape(B, Hl, Gs, n_q_blocks)
    pad_blocks = ((0, 0), (0, 0), (0, 0), (0, nqb_pad - n_q_blocks))
    idx = jnp.pad(idx, pad_blocks + ((0, 0),))
    cnt = jnp.pad(cnt, pad_blocks)  # padded query blocks list nothing
    listed = (jnp.arange(kmax)[None, None, None, None, :] < cnt[..., None]) & (idx >= 0) & (idx < n_kv_blocks)
    idx = jnp.clip(idx, 0, n_kv_blocks - 1)

    # Per-group window and sinks, [Hl, Gs]; no window = int32 max, so the predicate is always true.
    has_window = window is not None
    w_LG = per_group(window, Hs, "window", missing=np.iinfo(np.int32).max).reshape(Hl, Gs)
    sink_LG = per_group(n_sink if has_window else None, Hs, "n_sink", missing=0).reshape(Hl, Gs)

    qp = _positions(q_pos, B, Tq, tq_pad)
    kp_blocks = _positions(kv_pos, B, Tk, tk_pad).reshape(B, n_kv_blocks, kv_block)
    has_seg = segment_ids is not None
    if has_seg:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        q_seg = _pad_axis1(jnp.broadcast_to(jnp.asarray(q_seg, jnp.int32), (B, Tq)), tq_pad, 0)
        kv_seg_blocks = _pad_axis1(jnp.broadcast_to(jnp.asarray(kv_seg, jnp.int32), (B, Tk)), tk_pad, 0)
        kv_seg_blocks = kv_seg_blocks.reshape(B, n_kv_blocks, kv_block)
    else:
        q_seg = jnp.zeros((B, tq_pad), jnp.int32)
        kv_seg_blocks = None

    # K/V as blocks, KV heads first: [B, Hkv, nKb, kv_block, D].
    k_blocks = jnp.moveaxis(_pad_axis1(k, tk_pad, 0).reshape(B, n_kv_blocks, kv_block, Hkv, D), 3, 1)
    v_blocks = jnp.moveaxis(_pad_axis1(v, tk_pad, 0).reshape(B, n_kv_blocks, kv_block, Hkv, Dv), 3, 1)
    # Queries [B, Hkv, G, nQb_pad, q_block, D].
    q_blocked = _pad_axis1(q, tq_pad, 0).reshape(B, nqb_pad, q_block, Hkv, G, D).transpose(0, 3, 4, 1, 2, 5)

    b_ix = jnp.arange(B)[:, None, None, None, None]
    h_ix = jnp.arange(Hkv)[None, :, None, None, None]

    def step(k_blocks, v_blocks, kp_blocks, kv_seg_blocks, xs):
        """One group of C query blocks: o [B, Hkv, G, C, q_block, Dv], lse [B, Hkv, G, C, q_block]."""
        q_c, idx_c, listed_c, qp_c, qseg_c = xs  # [B,Hkv,G,C,bq,D], [B,Hl,Gs,C,Kmax] x2, [B,C,bq] x2
        C = idx_c.shape[3]
        # Gathered K/V [B, Hkv, Gs, C, Kmax, kv_block, D] -> [B, Hkv, Gs, C, span, D].
        idx_kv = jnp.broadcast_to(idx_c, (B, Hkv, Gs, C, kmax))
        k_g = k_blocks[b_ix, h_ix, idx_kv].reshape(B, Hkv, Gs, C, span, D)
        v_g = v_blocks[b_ix, h_ix, idx_kv].reshape(B, Hkv, Gs, C, span, Dv)
        if Gs == 1:
            s = jnp.einsum("BHGCQD,BHCSD->BHGCQS", q_c, k_g[:, :, 0], preferred_element_type=jnp.float32)
        else:
            s = jnp.einsum("BHGCQD,BHGCSD->BHGCQS", q_c, k_g, preferred_element_type=jnp.float32)
        s = s * scale

        # Visibility [B, Hl, Gs, C, q_block, span] on gathered positions (broadcasts over the score's heads).
        kp_g = kp_blocks[b_ix, idx_c].reshape(B, Hl, Gs, C, 1, span)
        qp_b = qp_c[:, None, None, :, :, None]
        vis = jnp.repeat(listed_c, kv_block, axis=-1).reshape(B, Hl, Gs, C, 1, span)
        vis = vis & (kp_g >= 0) & (qp_b >= 0)
        if causal:
            vis = vis & (kp_g <= qp_b)
        if has_window:
            w = w_LG[None, :, :, None, None, None]
            sink = sink_LG[None, :, :, None, None, None]
            vis = vis & ((qp_b - kp_g < w) | (kp_g < sink))
        if kv_seg_blocks is not None:
            kseg_g = kv_seg_blocks[b_ix, idx_c].reshape(B, Hl, Gs, C, 1, span)
            vis = vis & (kseg_g == qseg_c[:, None, None, :, :, None])

        # The double-where softmax (reference.py): masked logits -inf, exp gives 0 with a zero gradient; an empty
        # row's max becomes 0 and its sum 1, so no NaN reaches the gradient.
        s = jnp.where(vis, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        nonempty = denom > 0
        l_safe = jnp.where(nonempty, denom, 1.0)
        p = (p / l_safe).astype(v.dtype if v.dtype != jnp.float32 else jnp.float32)
        if Gs == 1:
            o = jnp.einsum("BHGCQS,BHCSV->BHGCQV", p, v_g[:, :, 0], preferred_element_type=jnp.float32)
        else:
            o = jnp.einsum("BHGCQS,BHGCSV->BHGCQV", p, v_g, preferred_element_type=jnp.float32)
        lse = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)[..., 0]
        return o, lse

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)

    xs = (
        _steps(q_blocked, n_steps, 3),
        _steps(idx, n_steps, 3),
        _steps(listed, n_steps, 3),
        _steps(qp.reshape(B, nqb_pad, q_block), n_steps, 1),
        _steps(q_seg.reshape(B, nqb_pad, q_block), n_steps, 1),
    )
    o, lse = jax.lax.map(lambda x: step(k_blocks, v_blocks, kp_blocks, kv_seg_blocks, x), xs)
    # [nS, B, Hkv, G, C, bq, *] -> [B, nS, C, bq, Hkv, G, *] -> [B, Tq, Hq, *].
    o = jnp.transpose(o, (1, 0, 4, 5, 2, 3, 6)).reshape(B, tq_pad, Hq, Dv)[:, :Tq].astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.transpose(lse, (1, 0, 4, 5, 2, 3)).reshape(B, tq_pad, Hq)[:, :Tq]
    return o, lse
