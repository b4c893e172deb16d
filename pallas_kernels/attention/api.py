"""Softmax attention behind one `implementation=` switch (pallas_kernels/dispatch.py).

Implementations:
- "reference": reference.py, plain jnp (any K and V, any float dtype).
- "xla": `jax.nn.dot_product_attention(implementation="xla")`; GQA natively, K == V, q/k/v of one dtype.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention; GPU only, bf16/fp16,
  K == V, K a multiple of 8 and at most 256. Checked here before any work, so a fallback never hides a bug.
- "pallas_tpu": jax's splash attention kernel (splash.py: a `CausalMask` or `FullMask`, flash attention whose memory
  is O(T), not the [T, T] scores of "xla"); TPU only, T a multiple of 128, S == T, K == V, no array mask. Opt-in:
  no TPU has run it yet.

Default order: cpu ("xla",), gpu ("cudnn", "xla"), tpu ("xla",). cuDNN is left out of the default for inputs that
are not bf16/fp16, so a float32 model on GPU goes straight to "xla" instead of warning about a fallback each trace.

jax.nn.dot_product_attention fills masked logits with a large negative number, so a query row with no visible key
comes back as the mean of v. The jax.nn paths zero such rows to match the reference (output 0, gradient 0).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from effarch.pallas_kernels.attention.reference import attention_reference
from effarch.pallas_kernels.attention.splash import attention_splash
from effarch.pallas_kernels.dispatch import dispatch, require_platform

OP = "dot_product_attention"

DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("cudnn", "xla"), "tpu": ("xla",)}
_WITHOUT_CUDNN = {platform: tuple(n for n in order if n != "cudnn") for platform, order in DEFAULT_ORDER.items()}
_HALF = (jnp.bfloat16, jnp.float16)


def _check_jax_nn_shapes(name: str, q, k, v) -> None:
    if k.shape[-1] != v.shape[-1]:
        raise NotImplementedError(f"{name!r} needs equal q/k and v head dims, got K={k.shape[-1]}, V={v.shape[-1]}")
    if not q.dtype == k.dtype == v.dtype:
        raise NotImplementedError(f"{name!r} needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _jax_nn(q, k, v, *, causal, scale, mask, implementation):
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None],
        scale=scale,
        is_causal=causal,
        implementation=implementation,
    )
    if mask is None:
        # Without a mask no row is empty: top-left causal attention always shows key 0.
        return out
    visible_BTS = mask
    if causal:
        T, S = mask.shape[1:]
        visible_BTS = visible_BTS & jnp.tril(jnp.ones((T, S), dtype=bool))[None]
    row_visible_BT11 = jnp.any(visible_BTS, axis=-1)[:, :, None, None]
    return jnp.where(row_visible_BT11, out, jnp.zeros((), out.dtype))


def _xla(q, k, v, *, causal, scale, mask):
    _check_jax_nn_shapes("xla", q, k, v)
    return _jax_nn(q, k, v, causal=causal, scale=scale, mask=mask, implementation="xla")


def _cudnn(q, k, v, *, causal, scale, mask):
    require_platform(OP, "cudnn", "gpu")
    if q.dtype not in _HALF:
        raise NotImplementedError(f"'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    _check_jax_nn_shapes("cudnn", q, k, v)
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        raise NotImplementedError(f"'cudnn' needs a head dim that is a multiple of 8 and <= 256, got {head_dim}")
    return _jax_nn(q, k, v, causal=causal, scale=scale, mask=mask, implementation="cudnn")


def _reference(q, k, v, *, causal, scale, mask):
    return attention_reference(q, k, v, causal=causal, scale=scale, mask=mask)


def _pallas_tpu(q, k, v, *, causal, scale, mask):
    if not q.dtype == k.dtype == v.dtype:
        raise NotImplementedError(f"'pallas_tpu' needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return attention_splash(q, k, v, causal=causal, scale=scale, mask=mask)


IMPLEMENTATIONS = {"reference": _reference, "xla": _xla, "cudnn": _cudnn, "pallas_tpu": _pallas_tpu}


def dot_product_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hkv K"],
    v: Float[Array, "B S Hkv V"],
    *,
    causal: bool,
    scale: float | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T H V"]:
    """Softmax attention, MHA / GQA / MQA by the ratio H / Hkv (query head h reads KV head h // (H // Hkv)).

    Args:
      q: queries, [B, T, H, K].
      k: keys, [B, S, Hkv, K]; H must be a multiple of Hkv.
      v: values, [B, S, Hkv, V].
      causal: if True, query i sees keys j <= i (top-left aligned, as jax.nn.dot_product_attention). For queries
        that start at an offset into the keys (prefill against a cache), pass causal=False and a mask.
      scale: logit scale; None means 1 / sqrt(K).
      mask: optional boolean [B, T, S]; True marks a visible key. A row with no visible key gives 0.
      implementation: "reference", "xla", "cudnn", "pallas_tpu", a sequence of them tried in order, or None for
        the platform default (see the module docstring). A single name fails at once if it cannot run here.

    Returns:
      [B, T, H, V] in q's dtype.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    return dispatch(
        OP,
        IMPLEMENTATIONS,
        implementation,
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        mask=mask,
        default_order=DEFAULT_ORDER if q.dtype in _HALF else _WITHOUT_CUDNN,
    )
