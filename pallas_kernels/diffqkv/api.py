"""DiffQKV attention behind one `implementation=` switch (pallas_kernels/dispatch.py).

Implementations:
- "reference": reference.py, plain jnp; gathers K and V per query head (the oracle, O(T * S) memory).
- "xla": xla.py, blockwise online softmax with a recomputing custom VJP; K and V heads are never repeated.
- "jax_nn": `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when it applies, else XLA). Its GQA covers
  only Hk == Hv and K == V with q, k, v of one dtype; otherwise it raises NotImplementedError before any work.

Default order: gpu ("jax_nn", "xla") when jax.nn covers the shapes, else ("xla",); cpu and tpu ("xla",). The order
is chosen from the shapes, so a differential-head call on GPU goes straight to "xla" without a fallback warning.
Sigma's own kernel (FlexHeadFA) is CUDA-only and not a JAX op; there is no Pallas kernel here yet.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.diffqkv.reference import diffqkv_reference, selective_v_reference
from effarch.pallas_kernels.diffqkv.xla import diffqkv_blockwise, selective_v_grouped
from effarch.pallas_kernels.dispatch import current_platform, dispatch

OP = "diffqkv_attention"


def _jax_nn_unsupported(q, k, v) -> str | None:
    """Why jax.nn.dot_product_attention cannot compute this call, or None if it can."""
    if k.shape[2] != v.shape[2]:
        return f"'jax_nn' needs as many K heads as V heads, got Hk={k.shape[2]}, Hv={v.shape[2]}"
    if k.shape[-1] != v.shape[-1]:
        return f"'jax_nn' needs equal K and V head dims, got K={k.shape[-1]}, V={v.shape[-1]}"
    if not q.dtype == k.dtype == v.dtype:
        return f"'jax_nn' needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def default_order(platform: str, q, k, v) -> tuple[str, ...]:
    """Implementations tried for implementation=None on `platform` ("cpu", "gpu", "tpu") for these inputs."""
    if platform == "gpu" and _jax_nn_unsupported(q, k, v) is None:
        return ("jax_nn", "xla")
    return ("xla",)


def _jax_nn(q, k, v, *, causal, scale, q_offset, block_size):
    del block_size
    reason = _jax_nn_unsupported(q, k, v)
    if reason is not None:
        raise NotImplementedError(reason)
    T, S = q.shape[1], k.shape[1]
    if isinstance(q_offset, int) and q_offset == 0:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal)
    # Queries start at q_offset into the keys (decoding): top-left causal with an offset is an explicit mask.
    # Key 0 is always visible (q_offset >= 0), so no row is empty and jax.nn's "mean of v" case cannot arise.
    mask_11TS = ((q_offset + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :])[None, None]
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask_11TS if causal else None)


def _xla(q, k, v, *, causal, scale, q_offset, block_size):
    return diffqkv_blockwise(q, k, v, causal=causal, scale=scale, q_offset=q_offset, block_size=block_size)


def _reference(q, k, v, *, causal, scale, q_offset, block_size):
    del block_size
    return diffqkv_reference(q, k, v, causal=causal, scale=scale, q_offset=q_offset)


IMPLEMENTATIONS = {"reference": _reference, "xla": _xla, "jax_nn": _jax_nn}


def _check_shapes(q, k, v) -> None:
    (B, _, Hq, K), (Bk, S, Hk, Kk), (Bv, Sv, Hv, _) = q.shape, k.shape, v.shape
    if not B == Bk == Bv or S != Sv:
        raise ValueError(f"{OP}: q {q.shape}, k {k.shape}, v {v.shape} disagree on batch or key length")
    if K != Kk:
        raise ValueError(f"{OP}: q head dim {K} != k head dim {Kk}")
    if Hq % Hk or Hq % Hv:
        raise ValueError(f"{OP}: query heads Hq={Hq} must be a multiple of K heads Hk={Hk} and V heads Hv={Hv}")


def diffqkv_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    v: Float[Array, "B S Hv V"],
    *,
    causal: bool = True,
    implementation: str | Sequence[str] | None = None,
    scale: float | None = None,
    q_offset: int | Int[Array, ""] = 0,
    block_size: int | None = None,
) -> Float[Array, "B T H V"]:
    """Softmax attention with independent query, K and V head counts (Sigma's DiffQKV, arXiv 2501.13629 §2).

    Query head i reads K head floor(i * Hk / Hq) and V head floor(i * Hv / Hq) (FlexHeadFA eq. 3); with Hk = Hv this
    is GQA. The logits are scaled by 1/sqrt(K).

    Args:
      q: queries, [B, T, Hq, K].
      k: keys, [B, S, Hk, K]; Hq a multiple of Hk.
      v: values, [B, S, Hv, V]; Hq a multiple of Hv. V may differ from K.
      causal: if True, query i sees key j <= q_offset + i (top-left aligned, as jax.nn.dot_product_attention).
      implementation: "reference", "xla", "jax_nn", a sequence of them tried in order, or None for the platform
        default (module docstring). A single name fails at once if it cannot run here.
      scale: logit scale; None means 1 / sqrt(K).
      q_offset: absolute position of query 0 when decoding against a cache (may be traced); only used when causal.
      block_size: at most this many keys per step of the "xla" path; None picks one (xla.diffqkv_blockwise).

    Returns:
      [B, T, Hq, V] in q's dtype.
    """
    _check_shapes(q, k, v)
    return dispatch(
        OP,
        IMPLEMENTATIONS,
        implementation,
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        q_offset=q_offset,
        block_size=block_size,
        # The platform the program is built for (the mesh's devices, pallas_kernels/dispatch.py), not the host's.
        default_order={(platform := current_platform()): default_order(platform, q, k, v)},
    )


def selective_v_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hk K"],
    v: Float[Array, "B S Hv V"],
    *,
    top_n: int,
    renormalize: bool = False,
    causal: bool = True,
    q_offset: int | Int[Array, ""] = 0,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T H V"]:
    """Selective V cache fetching for decoding (paper App. B.2): only the top-N V rows per query are read.

    alpha = softmax over every visible key (the K cache is small); o = sum_{j in top-N(alpha)} alpha_j V_j, not
    renormalised unless `renormalize` (the paper's Sel.V-topN). With top_n >= S it equals `diffqkv_attention`.

    Args:
      q, k, v, causal, q_offset: as in `diffqkv_attention`.
      top_n: N, V rows per (query, head).
      renormalize: rescale the selected weights to sum to 1.
      implementation: "reference" (K and V gathered per query head) or "xla" (grouped, the default everywhere).

    Returns:
      [B, T, Hq, V] in q's dtype.
    """
    _check_shapes(q, k, v)
    impls = {"reference": selective_v_reference, "xla": selective_v_grouped}
    order = {platform: ("xla",) for platform in ("cpu", "gpu", "tpu")}
    return dispatch(
        "selective_v_attention",
        impls,
        implementation,
        q,
        k,
        v,
        top_n=top_n,
        renormalize=renormalize,
        causal=causal,
        q_offset=q_offset,
        default_order=order,
    )


