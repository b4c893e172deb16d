"""block_stats_attention: dense softmax attention that also returns the block max-pooled attention map, the
distillation target of SeerAttention's gate (Gao et al., arXiv 2410.13276 §3: the ground truth is the 2-D
max-pooled attention map) and the oracle block selection of any sparse policy.

    o_i = Σ_{visible j} P_ij v_j,  P_ij = exp(s_ij − lse_i),  s_ij = scale · q_i·k_j,  lse_i = log Σ_{visible j} e^s_ij
    block_scores[b, h, I, J] = max_{i ∈ I, j ∈ J, visible(i, j)} P_ij        (0 where no pair is visible)

with I = i // q_block, J = j // kv_block, visible(i, j) = (¬causal ∨ j ≤ i) (array indices; Tq ≠ Tk allowed), one
map per query head (GQA K/V shared by the Hq / Hkv query heads of a group, never repeated in memory).

Paths (`implementation=`, pallas_kernels/dispatch.py):
- "reference": the dense [Tq, Tk] probabilities, then a max over each (q_block, kv_block) tile: the oracle.
- "xla" (the default): two passes, no [Tq, Tk] buffer. Pass 1 is flash attention for o and lse: this package's
  gathered-block path (xla.py) with every causal block listed, steps of query blocks, FA2 backward. Pass 2 recomputes
  the scores of a step of query blocks against all keys, takes P = exp(s − lse) on the visible entries and its
  tile maxima. SeerAttention's Triton kernel does it in one pass by storing each row's block-max logit (a [T, nKb]
  buffer) and rescaling at the end; the results are equal, the two passes need no [T, nKb] buffer.

The block scores are a target, not a path for gradients: they are returned under `stop_gradient` (gradients flow
through o only, as in the attention op). SeerAttention trains only the gate on a frozen model, so nothing upstream of
the map needs its gradient.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from effarch.pallas_kernels.block_sparse.reference import masked_softmax
from effarch.pallas_kernels.block_sparse.xla import STEP_SCORE_BYTES, block_sparse_xla
from effarch.pallas_kernels.dispatch import dispatch

OP = "block_stats_attention"
DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def _check(q, k, v, q_block: int, kv_block: int) -> None:
    B, Tq, Hq, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Tk, Hkv, D={D}], got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B={B}, Tk={k.shape[1]}, Hkv={k.shape[2]}, Dv], got {v.shape}")
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {k.shape[2]}")
    if q_block < 1 or kv_block < 1:
        raise ValueError(f"q_block and kv_block must be positive, got {q_block} and {kv_block}")


def block_stats_reference(q, k, v, *, q_block: int, kv_block: int, causal: bool = True, scale: float | None = None,
                          return_lse: bool = False):
    """The dense oracle: o, block_scores (and lse) from the [B, Hq, Tq, Tk] probabilities; float32 inside."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    s = jnp.einsum("BTHGD,BSHD->BHGTS", q.reshape(B, Tq, Hkv, G, D), k, preferred_element_type=jnp.float32) * scale
    visible = jnp.ones((Tq, Tk), bool)
    if causal:
        visible = jnp.arange(Tk)[None, :] <= jnp.arange(Tq)[:, None]
    p, lse = masked_softmax(s, visible)  # lse [B, Hkv, G, Tq]
    o = jnp.einsum("BHGTS,BSHV->BTHGV", p, v.astype(jnp.float32)).reshape(B, Tq, Hq, -1).astype(q.dtype)
    nqb, nkb = -(-Tq // q_block), -(-Tk // kv_block)
    tiles = jnp.pad(jax.lax.stop_gradient(p), ((0, 0),) * 3 + ((0, nqb * q_block - Tq), (0, nkb * kv_block - Tk)))
    scores = tiles.reshape(B, Hkv, G, nqb, q_block, nkb, kv_block).max(axis=(4, 6)).reshape(B, Hq, nqb, nkb)
    if not return_lse:
        return o, scores
    return o, scores, jnp.moveaxis(lse.reshape(B, Hq, Tq), 1, 2)


def causal_block_lists(n_q_blocks: int, n_kv_blocks: int, *, q_block: int, kv_block: int, causal: bool):
    """(idx [1, 1, nQb, nKb], cnt [1, 1, nQb]) int32 numpy: every key block holding a key some query of the block may
    see (all of them when not causal), in order."""
    last_q = (np.arange(n_q_blocks) + 1) * q_block - 1
    first_k = np.arange(n_kv_blocks) * kv_block
    allowed = first_k[None, :] <= last_q[:, None] if causal else np.ones((n_q_blocks, n_kv_blocks), bool)
    idx = np.where(allowed, np.arange(n_kv_blocks)[None, :], -1).astype(np.int32)
    return idx[None, None], allowed.sum(-1).astype(np.int32)[None, None]


def block_stats_xla(q, k, v, *, q_block: int, kv_block: int, causal: bool = True, scale: float | None = None,
                    return_lse: bool = False, q_blocks_per_step: int | None = None):
    """Two passes without a [Tq, Tk] buffer (module docstring). q_blocks_per_step: query blocks per step of both
    passes (static); None keeps one step's float32 scores within STEP_SCORE_BYTES, as xla.py does."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    nqb, nkb = -(-Tq // q_block), -(-Tk // kv_block)
    tk_pad = nkb * kv_block
    if q_blocks_per_step is None:
        most = int(np.clip(STEP_SCORE_BYTES // max(B * Hq * q_block * tk_pad * 4, 1), 1, nqb))
        q_blocks_per_step = -(-nqb // -(-nqb // most))  # equal steps: the least padding
    if q_blocks_per_step < 1:
        raise ValueError(f"q_blocks_per_step must be positive, got {q_blocks_per_step}")

    # Pass 1: flash attention over every causal block (one list for all heads).
    idx, cnt = causal_block_lists(nqb, nkb, q_block=q_block, kv_block=kv_block, causal=causal)
    idx, cnt = np.broadcast_to(idx, (B, 1, nqb, nkb)), np.broadcast_to(cnt, (B, 1, nqb))
    o, lse = block_sparse_xla(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), q_block=q_block, kv_block=kv_block,
                              causal=causal, scale=scale, return_lse=True, q_blocks_per_step=q_blocks_per_step)

    # Pass 2: P = exp(s - lse) per step of C query blocks against all keys, maxed over each tile.
    C = q_blocks_per_step
    n_steps = -(-nqb // C)
    tq_pad = n_steps * C * q_block
    qs = jnp.pad(jax.lax.stop_gradient(q), ((0, 0), (0, tq_pad - Tq), (0, 0), (0, 0)))
    qs = jnp.moveaxis(qs.reshape(B, n_steps, C * q_block, Hkv, G, D), 1, 0)
    lse_s = jnp.pad(jax.lax.stop_gradient(lse), ((0, 0), (0, tq_pad - Tq), (0, 0)), constant_values=-jnp.inf)
    lse_s = jnp.moveaxis(lse_s.reshape(B, n_steps, C * q_block, Hkv, G), 1, 0)
    rows = jnp.arange(tq_pad, dtype=jnp.int32).reshape(n_steps, C * q_block)
    keys = jnp.pad(jax.lax.stop_gradient(k), ((0, 0), (0, tk_pad - Tk), (0, 0), (0, 0)))
    cols = jnp.arange(tk_pad, dtype=jnp.int32)

    def step(xs):
        q_c, lse_c, rows_c = xs  # [B, Cq, Hkv, G, D], [B, Cq, Hkv, G], [Cq]
        s = jnp.einsum("BTHGD,BSHD->BHGTS", q_c, keys, preferred_element_type=jnp.float32) * scale
        lse_t = jnp.moveaxis(lse_c, 1, 3)[..., None]  # [B, Hkv, G, Cq, 1]
        vis = (cols[None, :] < Tk) & (rows_c[:, None] < Tq)
        if causal:
            vis = vis & (cols[None, :] <= rows_c[:, None])
        vis = vis[None, None, None] & jnp.isfinite(lse_t)  # [B, Hkv, G, Cq, Tk_pad]
        p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse_t), lse_t, 0.0)), 0.0)
        return p.reshape(B, Hkv, G, C, q_block, nkb, kv_block).max(axis=(4, 6))  # [B, Hkv, G, C, nKb]

    tiles = jax.lax.map(step, (qs, lse_s, rows))  # [n_steps, B, Hkv, G, C, nKb]
    scores = jnp.moveaxis(tiles, 0, 3).reshape(B, Hq, n_steps * C, nkb)[:, :, :nqb]
    scores = jax.lax.stop_gradient(scores)
    return (o, scores, lse) if return_lse else (o, scores)


IMPLEMENTATIONS = {"reference": block_stats_reference, "xla": block_stats_xla}


def block_stats_attention(
    q: Float[Array, "B Tq Hq D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv Dv"],
    *,
    q_block: int,
    kv_block: int,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | Sequence[str] | None = None,
):
    """Dense softmax attention and its block max-pooled probability map (module docstring).

    Args:
      q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]: Hq a multiple of Hkv.
      q_block, kv_block: the tiles of the map, in tokens (need not divide Tq, Tk: the last tiles are partial).
      causal: key index <= query index.
      scale: logit scale, default 1 / sqrt(D).
      return_lse: also return the float32 log-sum-exp [B, Tq, Hq].
      implementation: "reference", "xla" (the default on every platform), a sequence, or None.

    Returns:
      o [B, Tq, Hq, Dv] in q's dtype; block_scores [B, Hq, ceil(Tq / q_block), ceil(Tk / kv_block)] float32 in [0, 1]
      under stop_gradient; and lse [B, Tq, Hq] when return_lse.
    """
    _check(q, k, v, q_block, kv_block)
    return dispatch(OP, IMPLEMENTATIONS, implementation, q, k, v, q_block=q_block, kv_block=kv_block, causal=causal,
                    scale=scale, return_lse=return_lse, default_order=DEFAULT_ORDER)
