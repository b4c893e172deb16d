"""Public layers of effarch: NNX modules to drop into any Flax model.

Every mixer takes `(d_model, config, *, rngs)` (Lightning also `layer_idx, n_layers`; Titans' MAC / MAG / MAL
take two configs, `(d_model, memory, attention, *, rngs)`), maps x [B, T, D] to [B, T, D] with `__call__`, and
decodes through the `Mixer` protocol of `layers/axes.py` (`init_state`, `prefill`, `decode_step`, `state_size`).
MLPs take `(d_model, hidden, *, rngs)` and map [..., D] to [..., D]. For Flax Linen models, wrap any of them with
`effarch.layers.linen.to_linen` (docs/layers.md).

The decoder block (pre-norm mixer + MLP) is `effarch.arches.lm.Block`; it lives in arches/ because it picks its
mixer from the registry.
"""

# One import line per module, sorted (ruff's isort); the grouping is in __all__ below. A new mixer adds its
# `from effarch.layers.<mechanism> import <Mixer>, <Mixer>Config` line here and both names to __all__'s mixers.
from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.axes import Mixer
from effarch.layers.based import BasedConfig, BasedLinearAttention
from effarch.layers.conv import BaseConv, ConvConfig, ZoologyBaseConv
from effarch.layers.diffqkv import DiffQKVAttention, DiffQKVConfig
from effarch.layers.landmark import LandmarkAttention, LandmarkConfig
from effarch.layers.lightning import SGLU, LightningAttention, LightningConfig
from effarch.layers.mlp import MLPConfig, SwiGLU
from effarch.layers.moh import MoHAttention, MoHConfig
from effarch.layers.norms import SRMSNorm, rms_norm, srms_norm
from effarch.layers.rope import apply_rope
from effarch.layers.sliding_window import SlidingWindowAttention, SlidingWindowConfig
from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig
from effarch.layers.titans_attention import TitansAttentionConfig
from effarch.layers.titans_mac import MemoryAsContext
from effarch.layers.titans_mag import MemoryAsGate
from effarch.layers.titans_mal import MemoryAsLayer

__all__ = [
    "Mixer",
    # mixers
    "Attention",
    "AttentionConfig",
    "BasedConfig",
    "BasedLinearAttention",
    "BaseConv",
    "ConvConfig",
    "ZoologyBaseConv",
    "DiffQKVAttention",
    "DiffQKVConfig",
    "LandmarkAttention",
    "LandmarkConfig",
    "LightningAttention",
    "LightningConfig",
    "MoHAttention",
    "MoHConfig",
    "SlidingWindowAttention",
    "SlidingWindowConfig",
    "SparseAttention",
    "SparseAttentionConfig",
    "NeuralMemory",
    "NeuralMemoryConfig",
    "TitansAttentionConfig",
    "MemoryAsContext",
    "MemoryAsGate",
    "MemoryAsLayer",
    # MLPs
    "MLPConfig",
    "SGLU",
    "SwiGLU",
    # norms, positions
    "SRMSNorm",
    "rms_norm",
    "srms_norm",
    "apply_rope",
]
