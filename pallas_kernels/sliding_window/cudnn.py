"""Sliding-window attention through cuDNN flash attention (`jax.nn.dot_product_attention`).

`local_window_size=(window - 1, 0)` with `is_causal=True` keeps the keys j with t - (window - 1) <= j <= t, i.e.
effarch's window keys (reference.py); tests check the mapping through the XLA path of the same jax function.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from effarch.pallas_kernels.dispatch import require_platform


def dot_product_attention_window(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T Hkv K"],
    v: Float[Array, "B T Hkv V"],
    *,
    window: int,
    implementation: str | None,
) -> Float[Array, "B T H V"]:
    """`jax.nn.dot_product_attention` with effarch's window convention, scale 1/sqrt(K)."""
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(window - 1, 0), implementation=implementation
    )


def sliding_window_cudnn(
    q: Float[Array, "B T H K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv V"], *, window: int
) -> Float[Array, "B T H V"]:
    """cuDNN flash attention; GPU only, and cuDNN takes only bf16 / fp16 inputs."""
    require_platform("sliding_window_attention", "cudnn", "gpu")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cuDNN flash attention needs bfloat16 or float16 inputs, got {q.dtype}")
    return dot_product_attention_window(q, k, v, window=window, implementation="cudnn")
