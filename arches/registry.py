"""Token-mixer registry: a layer of the decoder LM is picked by name, so a hybrid layout is a list in the config.

Each entry builds one mixer from the model config and its layer index. Every mixer implements the
`effarch.layers.axes.Mixer` protocol (parallel call, init_state / prefill / decode_step, state_size).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

from flax import nnx

from effarch.layers.attention import Attention
from effarch.layers.based import BasedLinearAttention
from effarch.layers.conv import BaseConv, ZoologyBaseConv
from effarch.layers.diffqkv import DiffQKVAttention
from effarch.layers.landmark import LandmarkAttention
from effarch.layers.lightning import LightningAttention
from effarch.layers.moh import MoHAttention
from effarch.layers.sliding_window import SlidingWindowAttention
from effarch.layers.titans import NeuralMemory
from effarch.layers.titans_mac import MemoryAsContext
from effarch.layers.titans_mag import MemoryAsGate
from effarch.layers.titans_mal import MemoryAsLayer

if TYPE_CHECKING:
    from effarch.arches.lm import ModelConfig

MixerFactory = Callable[["ModelConfig", int, nnx.Rngs], nnx.Module]

MIXERS: dict[str, MixerFactory] = {
    "attention": lambda cfg, layer_idx, rngs: Attention(cfg.d_model, cfg.attention, rngs=rngs),
    "base_conv": lambda cfg, layer_idx, rngs: BaseConv(cfg.d_model, cfg.conv, rngs=rngs),
    "zoology_base_conv": lambda cfg, layer_idx, rngs: ZoologyBaseConv(cfg.d_model, cfg.conv, rngs=rngs),
    "based": lambda cfg, layer_idx, rngs: BasedLinearAttention(cfg.d_model, cfg.based, rngs=rngs),
    "sliding_window": lambda cfg, layer_idx, rngs: SlidingWindowAttention(cfg.d_model, cfg.sliding_window, rngs=rngs),
    "titans_lmm": lambda cfg, layer_idx, rngs: NeuralMemory(cfg.d_model, cfg.titans, rngs=rngs),
    # The decay rate depends on the layer's depth (TNL's schedule), hence layer_idx / n_layers.
    "lightning": lambda cfg, layer_idx, rngs: LightningAttention(
        cfg.d_model, cfg.lightning, layer_idx=layer_idx, n_layers=cfg.n_layers, rngs=rngs
    ),
    "diffqkv": lambda cfg, layer_idx, rngs: DiffQKVAttention(cfg.d_model, cfg.diffqkv, rngs=rngs),
    "moh": lambda cfg, layer_idx, rngs: MoHAttention(cfg.d_model, cfg.moh, rngs=rngs),
    "landmark": lambda cfg, layer_idx, rngs: LandmarkAttention(cfg.d_model, cfg.landmark, rngs=rngs),
    # Titans' hybrids: the memory from cfg.titans, the attention from cfg.titans_attention.
    "titans_mac": lambda cfg, layer_idx, rngs: MemoryAsContext(cfg.d_model, cfg.titans, cfg.titans_attention,
                                                               rngs=rngs),
    "titans_mag": lambda cfg, layer_idx, rngs: MemoryAsGate(cfg.d_model, cfg.titans, cfg.titans_attention, rngs=rngs),
    "titans_mal": lambda cfg, layer_idx, rngs: MemoryAsLayer(cfg.d_model, cfg.titans, cfg.titans_attention, rngs=rngs),
}


def build_mixer(name: str, cfg: "ModelConfig", layer_idx: int, rngs: nnx.Rngs) -> nnx.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}")
    return MIXERS[name](cfg, layer_idx, rngs)
