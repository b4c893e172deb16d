"""BASED Taylor linear attention (arXiv 2402.18668): parallel, chunked and recurrent forms."""

from effarch.pallas_kernels.based.api import (
    based_decode_step,
    based_init_state,
    based_linear_attention,
    based_prefill,
)
from effarch.pallas_kernels.based.reference import BasedState, feature_dim_expanded, taylor_feature_map

__all__ = [
    "BasedState",
    "based_decode_step",
    "based_init_state",
    "based_linear_attention",
    "based_prefill",
    "feature_dim_expanded",
    "taylor_feature_map",
]
