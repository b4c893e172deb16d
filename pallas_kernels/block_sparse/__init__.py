"""Block-sparse softmax attention: each query block attends to a list of key blocks (per head group, per batch row),
with causal / window / sink / segment predicates on token positions; `merge_attention` joins two disjoint parts;
`block_stats_attention` is dense attention that also returns the block max-pooled attention map (stats.py);
`sparse_decode_attention` attends one query step over the selected entries of a KV cache (decode.py)."""

from effarch.pallas_kernels.block_sparse.api import block_sparse_attention
from effarch.pallas_kernels.block_sparse.decode import sparse_decode_attention
from effarch.pallas_kernels.block_sparse.lists import random_causal_lists
from effarch.pallas_kernels.block_sparse.reference import block_sparse_reference, merge_attention, visible_mask
from effarch.pallas_kernels.block_sparse.stats import block_stats_attention

__all__ = ["block_sparse_attention", "block_sparse_reference", "block_stats_attention", "merge_attention",
           "random_causal_lists", "sparse_decode_attention", "visible_mask"]
