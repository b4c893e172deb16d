"""Sigma DiffQKV attention (arXiv 2501.13629): independent query, K and V heads, plus selective V fetching."""

from effarch.pallas_kernels.diffqkv.api import default_order, diffqkv_attention, selective_v_attention
from effarch.pallas_kernels.diffqkv.reference import diffqkv_reference, head_index, selective_v_reference

__all__ = [
    "default_order",
    "diffqkv_attention",
    "diffqkv_reference",
    "head_index",
    "selective_v_attention",
    "selective_v_reference",
]
