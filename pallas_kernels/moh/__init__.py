"""Mixture-of-head attention (MoH, arXiv 2410.11842): softmax attention in which each token uses only its active
heads, each scaled by a gate, summed through the output projection."""

from effarch.pallas_kernels.moh.api import mixture_of_heads_attention
from effarch.pallas_kernels.moh.reference import dense_head_gates, mixture_of_heads_reference

__all__ = ["dense_head_gates", "mixture_of_heads_attention", "mixture_of_heads_reference"]
