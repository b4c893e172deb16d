"""Titans neural long-term memory: a memory MLP trained at test time (arXiv 2501.00663)."""

from effarch.pallas_kernels.titans.api import (
    neural_memory_init_state,
    neural_memory_retrieve,
    neural_memory_scan,
    neural_memory_step,
)
from effarch.pallas_kernels.titans.reference import MemoryState

__all__ = ["MemoryState", "neural_memory_init_state", "neural_memory_retrieve", "neural_memory_scan",
           "neural_memory_step"]
