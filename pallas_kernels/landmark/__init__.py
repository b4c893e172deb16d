"""Landmark attention: grouped softmax over landmark-delimited blocks (arXiv 2305.16300)."""

from effarch.pallas_kernels.landmark.api import landmark_attention, landmark_attention_cached
from effarch.pallas_kernels.landmark.reference import block_ids, landmark_weights

__all__ = ["block_ids", "landmark_attention", "landmark_attention_cached", "landmark_weights"]
