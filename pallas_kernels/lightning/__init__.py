"""Lightning Attention-2: causal linear attention with a fixed per-head decay (arXiv 2401.04658)."""

from effarch.pallas_kernels.lightning.api import (
    lightning_attention,
    lightning_attention_step,
    lightning_attention_with_state,
)
from effarch.pallas_kernels.lightning.decay import alibi_slopes, tnl_decay

__all__ = [
    "alibi_slopes",
    "lightning_attention",
    "lightning_attention_step",
    "lightning_attention_with_state",
    "tnl_decay",
]
