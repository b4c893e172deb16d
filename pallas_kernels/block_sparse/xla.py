"""Block-sparse softmax attention in plain XLA: gathers only the listed key blocks, O(Tq · Kmax · kv_block) memory.

The contract is reference.py's (README.md in this folder). For every query block I and list entry c, the key block
J = block_idx[b, g, I, c] is gathered whole (K, V, positions, segments: `kv_block` contiguous tokens, so the gather and
its transpose, the scatter-add of dK/dV, move blocks rather than single tokens). The scores of query block I are then
[q_block, Kmax · kv_block]; entries c >= block_cnt, and ids outside [0, nKb), are masked, and the token predicates
(padding, causal, window / sinks per group, segments) are evaluated on the gathered positions. Nothing of size
[Tq, Tk] is ever built.

Heads: with Hs = 1 or Hkv one gathered K/V block serves the Hq / Hkv query heads of a KV head (Hs = 1 broadcasts the
list over the KV heads); with Hs = Hq each query head gathers its own blocks (Hq / Hkv times the bytes).

Steps and backward: the query blocks are processed `q_blocks_per_step` at a time (`lax.map` forward, `lax.scan`
backward). The backward is written by hand behind `jax.custom_vjp`, as FlashAttention-2 does (arXiv 2307.08691,
Algorithm 2): it saves o and lse, and per step re-gathers K/V, recomputes P = exp(S - lse) on the visible entries,
and forms dS = P ∘ (dP - rowsum(dO ∘ o) + dlse), dQ = dS K, dK = dSᵀ Q, dV = Pᵀ dO, scatter-adding the gathered
blocks' dK/dV into float32 accumulators. So the live score-sized buffers are one step's
[B, Hq, q_blocks_per_step, q_block, Kmax · kv_block], the saved residuals O(Tq · (D + Dv)). (Autodiff through a
`jax.checkpoint`ed step needs the same memory but recomputes the P·V product and the softmax's max and sum: it was
1.24x slower at T = 4k and 1.3x at 8k, fwd + bwd, same run, on the 2-core CPU.)

The softmax is the reference's double-where form (masked logits -inf, an empty row's max replaced by 0 and its sum by
1): an empty row gives o = 0, lse = -inf, and P = 0 there in the backward, so its gradients are zero and finite.

Precision: scores, the probability-value contraction and every gradient accumulate in float32; bf16 inputs stay bf16
in the gathers (the probabilities are cast to v's dtype for the forward contraction, as flash attention kernels do).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse.reference import group_of_heads, per_group

# Default bound on one step's float32 score buffer [B, Hq, steps' query blocks, q_block, Kmax · kv_block], in bytes.
# A step's backward keeps several buffers of that size live (scores, probabilities, mask, dP, dS) next to the gathered
# K/V and their gradients. fwd + bwd at T = 8k, H = 4, D = 64, 10% of the blocks: compiled temporaries 36, 49, 100,
# 305 and 674 MiB at 1, 4, 16, 64 and 128 query blocks per step, while 4 to 128 timed alike within the load noise of
# the 2-core CPU (measured with the earlier checkpointed-autodiff backward); hence a small bound (4 per step there).
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
):
    """Gathered-block attention (module docstring); arguments as `block_sparse_attention`, plus:

    Args:
      q_blocks_per_step: query blocks computed together in one step (static); None takes the fewest steps whose
        float32 scores fit STEP_SCORE_BYTES, split evenly. nQb is padded up to a multiple (the padded blocks have
        empty lists).

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

    def gather(blocks, idx_c, width):
        """[B, Hkv, nKb, kv_block, width] at the listed ids -> [B, Hkv, Gs, C, span, width]."""
        idx_kv = jnp.broadcast_to(idx_c, (B, Hkv) + idx_c.shape[2:])
        return blocks[b_ix, h_ix, idx_kv].reshape(B, Hkv, Gs, idx_c.shape[3], span, width)

    def visible(kp_blocks, kv_seg_blocks, idx_c, listed_c, qp_c, qseg_c):
        """[B, Hl, Gs, C, q_block, span] on gathered positions (broadcasts over the score's heads)."""
        C = idx_c.shape[3]
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
        return vis

    # Einsums over the gathered keys: "BHCSD" when one gathered block serves the Hq / Hkv query heads of a KV head
    # (Gs = 1, the G axis squeezed), "BHGCSD" per query head.
    kv_spec = "BHCS" if Gs == 1 else "BHGCS"

    def squeeze(x_g):
        return x_g[:, :, 0] if Gs == 1 else x_g

    def fwd_step(k_blocks, v_blocks, ints, xs):
        """One group of C query blocks: o [B, Hkv, G, C, q_block, Dv] float32, lse [B, Hkv, G, C, q_block]."""
        kp_blocks, kv_seg_blocks = ints
        q_c, idx_c, listed_c, qp_c, qseg_c = xs
        k_g, v_g = squeeze(gather(k_blocks, idx_c, D)), squeeze(gather(v_blocks, idx_c, Dv))
        s = jnp.einsum(f"BHGCQD,{kv_spec}D->BHGCQS", q_c, k_g, preferred_element_type=jnp.float32) * scale
        vis = visible(kp_blocks, kv_seg_blocks, idx_c, listed_c, qp_c, qseg_c)
        s = jnp.where(vis, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        nonempty = denom > 0
        l_safe = jnp.where(nonempty, denom, 1.0)
        p = (p / l_safe).astype(v.dtype if v.dtype != jnp.float32 else jnp.float32)
        o = jnp.einsum(f"BHGCQS,{kv_spec}V->BHGCQV", p, v_g, preferred_element_type=jnp.float32)
        lse = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)[..., 0]
        return o, lse

    def run_forward(q_blocked, k_blocks, v_blocks, ints, xs_int):
        return jax.lax.map(lambda x: fwd_step(k_blocks, v_blocks, ints, x), (q_blocked,) + xs_int)

    @jax.custom_vjp
    def core(q_blocked, k_blocks, v_blocks, ints, xs_int):
        return run_forward(q_blocked, k_blocks, v_blocks, ints, xs_int)

    def core_fwd(q_blocked, k_blocks, v_blocks, ints, xs_int):
        o, lse = run_forward(q_blocked, k_blocks, v_blocks, ints, xs_int)
        return (o, lse), (q_blocked, k_blocks, v_blocks, ints, xs_int, o, lse)

    def core_bwd(res, cts):
        """FA2-style: recompute P = exp(S - lse) per step; dS = P (dP - rowsum(dO o) + dlse); dK/dV scatter-added."""
        q_blocked, k_blocks, v_blocks, ints, xs_int, o, lse = res
        do, dlse = cts
        kp_blocks, kv_seg_blocks = ints

        def bwd_step(carry, x):
            dk_blocks, dv_blocks = carry
            q_c, idx_c, listed_c, qp_c, qseg_c, o_c, lse_c, do_c, dlse_c = x
            k_g, v_g = squeeze(gather(k_blocks, idx_c, D)), squeeze(gather(v_blocks, idx_c, Dv))
            s = jnp.einsum(f"BHGCQD,{kv_spec}D->BHGCQS", q_c, k_g, preferred_element_type=jnp.float32) * scale
            vis = visible(kp_blocks, kv_seg_blocks, idx_c, listed_c, qp_c, qseg_c)
            lse_safe = jnp.where(jnp.isfinite(lse_c), lse_c, 0.0)[..., None]
            p = jnp.where(vis, jnp.exp(s - lse_safe), 0.0)
            do_c = do_c.astype(jnp.float32)
            dp = jnp.einsum(f"BHGCQV,{kv_spec}V->BHGCQS", do_c, v_g, preferred_element_type=jnp.float32)
            delta = jnp.sum(do_c * o_c, axis=-1, keepdims=True)
            ds = p * (dp - delta + dlse_c[..., None]) * scale
            dq_c = jnp.einsum(f"BHGCQS,{kv_spec}D->BHGCQD", ds, k_g, preferred_element_type=jnp.float32)
            out_spec = "BHCSD" if Gs == 1 else "BHGCSD"
            dk_g = jnp.einsum(f"BHGCQS,BHGCQD->{out_spec}", ds, q_c, preferred_element_type=jnp.float32)
            dv_g = jnp.einsum(f"BHGCQS,BHGCQV->{out_spec.replace('D', 'V')}", p, do_c,
                              preferred_element_type=jnp.float32)
            C = idx_c.shape[3]
            idx_kv = jnp.broadcast_to(idx_c, (B, Hkv, Gs, C, kmax))
            dk_blocks = dk_blocks.at[b_ix, h_ix, idx_kv].add(dk_g.reshape(B, Hkv, Gs, C, kmax, kv_block, D))
            dv_blocks = dv_blocks.at[b_ix, h_ix, idx_kv].add(dv_g.reshape(B, Hkv, Gs, C, kmax, kv_block, Dv))
            return (dk_blocks, dv_blocks), dq_c

        zeros = (jnp.zeros(k_blocks.shape, jnp.float32), jnp.zeros(v_blocks.shape, jnp.float32))
        (dk_blocks, dv_blocks), dq = jax.lax.scan(bwd_step, zeros, (q_blocked,) + xs_int + (o, lse, do, dlse))
        return (dq.astype(q_blocked.dtype), dk_blocks.astype(k_blocks.dtype), dv_blocks.astype(v_blocks.dtype),
                None, None)

    core.defvjp(core_fwd, core_bwd)

    xs_int = (
        _steps(idx, n_steps, 3),
        _steps(listed, n_steps, 3),
        _steps(qp.reshape(B, nqb_pad, q_block), n_steps, 1),
        _steps(q_seg.reshape(B, nqb_pad, q_block), n_steps, 1),
    )
    o, lse = core(_steps(q_blocked, n_steps, 3), k_blocks, v_blocks, (kp_blocks, kv_seg_blocks), xs_int)
    # [nS, B, Hkv, G, C, bq, *] -> [B, nS, C, bq, Hkv, G, *] -> [B, Tq, Hq, *].
    o = jnp.transpose(o, (1, 0, 4, 5, 2, 3, 6)).reshape(B, tq_pad, Hq, Dv)[:, :Tq].astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.transpose(lse, (1, 0, 4, 5, 2, 3)).reshape(B, tq_pad, Hq)[:, :Tq]
    return o, lse
