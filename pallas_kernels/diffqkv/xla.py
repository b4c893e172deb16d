"""DiffQKV attention in plain XLA: blockwise online softmax over key blocks, K and V heads never repeated.

Derivation in README.md. Query heads are viewed two ways, as [Hk, Gk] groups (Gk = Hq / Hk query heads per K head)
for the logits and as [Hv, Gv] groups for the values; both views are reshapes of the same [Hq] axis, because query
head i = hk * Gk + g reads K head floor(i / Gk) = floor(i * Hk / Hq). So the [B, Hq, T, S] scores are computed
against k [B, S, Hk, K] and applied to v [B, S, Hv, V] directly.

The forward pass keeps the running max m, normaliser l and output accumulator per (query, head) while it scans
over key blocks of `block_size` keys (FlashAttention-2, arXiv 2307.08691, Alg. 1 with the query loop vectorised),
and saves only o and the log-sum-exp. The backward pass (Alg. 2) recomputes each block's probabilities from the
log-sum-exp, so memory is O(T * Hq * block_size) in both directions instead of O(T * S * Hq).

In the einsums H is the K (or V) head axis and G the query heads of its group.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

DEFAULT_BLOCK_SIZE = 512
# With block_size=None, a call whose whole [B, Hq, T, S] score tensor has at most this many elements (16 MiB in
# float32) runs as one block: decoding (T = 1) then costs one pass over the cache instead of a scan.
SINGLE_BLOCK_ELEMENTS = 2**22


def _blocks(x, block: int):
    """[B, S, H, D] -> [N, B, block, H, D], zero-padded at the end (the padded keys are masked)."""
    B, S, H, D = x.shape
    n = -(-S // block)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block - S), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(B, n, block, H, D), 1, 0)


def _visible(n, block: int, S: int, T: int, causal: bool, q_offset) -> Array:
    """[T, block] mask of block n: real keys (not padding), and j <= q_offset + t when causal."""
    key_pos = n * block + jnp.arange(block)
    visible = jnp.broadcast_to((key_pos < S)[None, :], (T, block))
    if causal:
        visible = visible & ((q_offset + jnp.arange(T))[:, None] >= key_pos[None, :])
    return visible


def _scan(step, init, xs):
    """lax.scan, or one direct call when there is a single block (decoding, short sequences): less to compile."""
    if xs[1].shape[0] == 1:
        carry, out = step(init, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda x: x[None], out)
    return jax.lax.scan(step, init, xs)


def _logits(q_BTHGK, k_BSHK, visible_TS) -> Float[Array, "B Hq T S"]:
    B, T, Hk, Gk, _ = q_BTHGK.shape
    s_BHGTS = jnp.einsum("BTHGK,BSHK->BHGTS", q_BTHGK, k_BSHK)
    s_BHTS = s_BHGTS.reshape(B, Hk * Gk, T, -1)
    return jnp.where(visible_TS[None, None], s_BHTS, -jnp.inf)


def _forward(q, k, v, q_offset, causal: bool, scale: float, block: int):
    B, T, Hq, K = q.shape
    S, Hk, Hv, V = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    q_BTHGK = (q.astype(jnp.float32) * scale).reshape(B, T, Hk, Hq // Hk, K)
    k_blocks, v_blocks = _blocks(k, block), _blocks(v, block)

    def step(carry, inputs):
        m_BHT, l_BHT, acc_BTHGV = carry
        n, k_BSHK, v_BSHV = inputs
        s_BHTS = _logits(q_BTHGK, k_BSHK, _visible(n, block, S, T, causal, q_offset))
        m_new = jnp.maximum(m_BHT, jnp.max(s_BHTS, axis=-1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 there so exp gives 0, not NaN.
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p_BHTS = jnp.exp(s_BHTS - m_safe[..., None])
        correction_BHT = jnp.exp(m_BHT - m_safe)
        l_BHT = l_BHT * correction_BHT + jnp.sum(p_BHTS, axis=-1)
        p_BHGTS = p_BHTS.reshape(B, Hv, Hq // Hv, T, -1)
        correction_BTHG1 = jnp.moveaxis(correction_BHT.reshape(B, Hv, Hq // Hv, T), 3, 1)[..., None]
        acc_BTHGV = acc_BTHGV * correction_BTHG1 + jnp.einsum("BHGTS,BSHV->BTHGV", p_BHGTS, v_BSHV)
        return (m_new, l_BHT, acc_BTHGV), None

    init = (
        jnp.full((B, Hq, T), -jnp.inf, jnp.float32),
        jnp.zeros((B, Hq, T), jnp.float32),
        jnp.zeros((B, T, Hv, Hq // Hv, V), jnp.float32),
    )
    (m, denom, acc), _ = _scan(step, init, (jnp.arange(k_blocks.shape[0]), k_blocks, v_blocks))
    l_BTH1 = jnp.moveaxis(denom, 2, 1)[..., None]
    o_BTHV = acc.reshape(B, T, Hq, V) / jnp.where(l_BTH1 > 0, l_BTH1, 1.0)
    # +inf for rows with no visible key: the backward pass's exp(s - lse) is then 0 for them.
    lse_BHT = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), jnp.inf)
    return o_BTHV, lse_BHT


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, q_offset, causal, scale, block):
    o, _ = _forward(q, k, v, q_offset, causal, scale, block)
    return o.astype(q.dtype)


def _attention_fwd(q, k, v, q_offset, causal, scale, block):
    o, lse = _forward(q, k, v, q_offset, causal, scale, block)
    return o.astype(q.dtype), (q, k, v, q_offset, o, lse)


def _attention_bwd(causal, scale, block, residuals, do):
    q, k, v, q_offset, o, lse_BHT = residuals
    B, T, Hq, K = q.shape
    S, Hk, Hv = k.shape[1], k.shape[2], v.shape[2]
    Gk, Gv = Hq // Hk, Hq // Hv
    q_BTHGK = (q.astype(jnp.float32) * scale).reshape(B, T, Hk, Gk, K)
    do_BTHV = do.astype(jnp.float32)
    do_BTHGV = do_BTHV.reshape(B, T, Hv, Gv, -1)
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij (FlashAttention-2 Alg. 2, line 4).
    delta_BHT = jnp.moveaxis(jnp.sum(do_BTHV * o, axis=-1), 1, 2)
    k_blocks, v_blocks = _blocks(k, block), _blocks(v, block)

    def step(dq_BTHGK, inputs):
        n, k_BSHK, v_BSHV = inputs
        s_BHTS = _logits(q_BTHGK, k_BSHK, _visible(n, block, S, T, causal, q_offset))
        p_BHTS = jnp.exp(s_BHTS - lse_BHT[..., None])
        # The V group view sums dV over the query heads that share a V head; dP is read back in the same view.
        dv_BSHV = jnp.einsum("BHGTS,BTHGV->BSHV", p_BHTS.reshape(B, Hv, Gv, T, -1), do_BTHGV)
        dp_BHTS = jnp.einsum("BTHGV,BSHV->BHGTS", do_BTHGV, v_BSHV).reshape(B, Hq, T, -1)
        ds_BHGTS = (p_BHTS * (dp_BHTS - delta_BHT[..., None])).reshape(B, Hk, Gk, T, -1)
        dq_BTHGK = dq_BTHGK + jnp.einsum("BHGTS,BSHK->BTHGK", ds_BHGTS, k_BSHK)
        dk_BSHK = jnp.einsum("BHGTS,BTHGK->BSHK", ds_BHGTS, q_BTHGK)
        return dq_BTHGK, (dk_BSHK, dv_BSHV)

    dq, (dk_blocks, dv_blocks) = _scan(
        step, jnp.zeros((B, T, Hk, Gk, K), jnp.float32), (jnp.arange(k_blocks.shape[0]), k_blocks, v_blocks)
    )
    # s = scale * q . k: dq = scale * dS k; dk = dS (scale * q), already scaled through q_BTHGK.
    dq = (dq * scale).reshape(B, T, Hq, K)
    dk = jnp.moveaxis(dk_blocks, 0, 1).reshape(B, -1, Hk, K)[:, :S]
    dv = jnp.moveaxis(dv_blocks, 0, 1).reshape(B, -1, Hv, v.shape[3])[:, :S]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def diffqkv_blockwise(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    v: Float[Array, "B S Hv V"],
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | Int[Array, ""] = 0,
    block_size: int | None = None,
) -> Float[Array, "B T H V"]:
    """Blockwise online-softmax DiffQKV attention with a recomputing backward pass.

    Args:
      q: queries, [B, T, Hq, K].
      k: keys, [B, S, Hk, K]; Hq must be a multiple of Hk.
      v: values, [B, S, Hv, V]; Hq must be a multiple of Hv.
      causal: if True, query i sees key j only when j <= q_offset + i.
      scale: logit scale; None means 1 / sqrt(K).
      q_offset: absolute position of query 0 (may be traced); not differentiated.
      block_size: at most this many keys per scan step; S need not be a multiple (the tail is padded and masked).
        None: one block when the score tensor is small (SINGLE_BLOCK_ELEMENTS), else DEFAULT_BLOCK_SIZE.

    Returns:
      [B, T, Hq, V] in q's dtype.
    """
    Hq, Hk, Hv = q.shape[2], k.shape[2], v.shape[2]
    if Hq % Hk or Hq % Hv:
        raise NotImplementedError(f"'xla' needs Hq a multiple of Hk and of Hv, got Hq={Hq}, Hk={Hk}, Hv={Hv}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    B, T, _, _ = q.shape
    S = k.shape[1]
    if block_size is None:
        block_size = S if B * Hq * T * S <= SINGLE_BLOCK_ELEMENTS else DEFAULT_BLOCK_SIZE
    # Equal blocks of at most block_size keys: the padding is less than one key per block.
    n_blocks = -(-S // block_size)
    block = -(-S // n_blocks)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_jit(q, k, v, jnp.asarray(q_offset, jnp.int32), causal, scale, block)


# Eager calls (tests, eager decoding) reuse one compilation per shape instead of re-tracing the scans each time;
# inside an outer jit this is inlined.
_attention_jit = jax.jit(_attention, static_argnums=(4, 5, 6))


def selective_v_grouped(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    v: Float[Array, "B S Hv V"],
    *,
    top_n: int,
    renormalize: bool = False,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | Int[Array, ""] = 0,
) -> Float[Array, "B T H V"]:
    """Selective V fetching (reference.selective_v_reference) with grouped logits: K and V are never repeated.

    The logits against every cached key are computed in the [Hk, Gk] view; only the top-N V rows per (query,
    head) are gathered from v. Inference only: the top-N selection has no useful gradient.
    """
    if top_n < 1:
        raise ValueError(f"selective V: top_n must be positive, got {top_n}")
    B, T, Hq, K = q.shape
    S, Hk, Hv = k.shape[1], k.shape[2], v.shape[2]
    if Hq % Hk or Hq % Hv:
        raise NotImplementedError(f"selective V needs Hq a multiple of Hk and of Hv, got {Hq}, {Hk}, {Hv}")
    scale = K**-0.5 if scale is None else scale
    q_BTHGK = (q.astype(jnp.float32) * scale).reshape(B, T, Hk, Hq // Hk, K)
    s_BHTS = _logits(q_BTHGK, k.astype(jnp.float32), _visible(0, S, S, T, causal, q_offset))
    row_max = jnp.max(s_BHTS, axis=-1, keepdims=True)
    p_BHTS = jnp.exp(s_BHTS - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(p_BHTS, axis=-1, keepdims=True)
    alpha_BHTS = p_BHTS / jnp.where(denom > 0, denom, 1.0)
    alpha_BHTN, idx_BHTN = jax.lax.top_k(alpha_BHTS, min(top_n, S))
    if renormalize:
        mass = jnp.sum(alpha_BHTN, axis=-1, keepdims=True)
        alpha_BHTN = alpha_BHTN / jnp.where(mass > 0, mass, 1.0)
    b_B111 = jnp.arange(B)[:, None, None, None]
    hv_1H11 = (jnp.arange(Hq) // (Hq // Hv))[None, :, None, None]
    rows_BHTNV = v[b_B111, idx_BHTN, hv_1H11].astype(jnp.float32)
    return jnp.einsum("BHTN,BHTNV->BTHV", alpha_BHTN, rows_BHTNV).astype(q.dtype)
