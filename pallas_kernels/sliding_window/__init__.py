"""Sliding-window causal softmax attention (BASED SWA, arXiv 2402.18668): query t sees keys t - window < j <= t."""

from effarch.pallas_kernels.sliding_window.api import (
    sliding_window_attention,
    sliding_window_decode_step,
    sliding_window_init_cache,
    sliding_window_prefill,
)
from effarch.pallas_kernels.sliding_window.cache import SlidingWindowCache

__all__ = [
    "SlidingWindowCache",
    "sliding_window_attention",
    "sliding_window_decode_step",
    "sliding_window_init_cache",
    "sliding_window_prefill",
]
