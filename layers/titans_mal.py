"""Titans MAL, memory as a layer (arXiv 2501.00663 §4.3): the neural memory, then sliding-window attention.

    x̃ = [p_1 .. p_Np] || x,   y = M(x̃),   o = SW-Attn(y)

- M is the NeuralMemory layer (layers/titans.py), which stores the persistent tokens before the input (its
  `n_persistent`); its outputs at the persistent positions are dropped, so the attention sees y of the real tokens
  only (choice: the paper's plain SW-Attn has no persistent prefix).
- SW-Attn is the existing SlidingWindowAttention layer (window `titans_attention.window`, RoPE) over y.

The block structure is H3's with the sequence model replaced by the LMM. Decoding state: the memory layer's state
and the attention's ring buffer; constant size.
"""

from typing import NamedTuple

from flax import nnx

from effarch.layers.axes import Hidden, HiddenStep
from effarch.layers.sliding_window import SlidingWindowAttention, SlidingWindowConfig
from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from effarch.layers.titans_attention import TitansAttentionConfig
from effarch.pallas_kernels.sliding_window.cache import SlidingWindowCache


class MemoryAsLayerState(NamedTuple):
    memory: NeuralMemoryState
    attn: SlidingWindowCache


class MemoryAsLayer(nnx.Module):
    """Titans MAL mixer: [B, T, d_model] -> [B, T, d_model]. Implements the `Mixer` protocol."""

    def __init__(self, d_model: int, memory: NeuralMemoryConfig, attention: TitansAttentionConfig, *,
                 rngs: nnx.Rngs):
        if d_model % attention.n_heads:
            raise ValueError(f"titans_attention.n_heads={attention.n_heads} must divide d_model={d_model}")
        self.memory = NeuralMemory(d_model, memory, rngs=rngs)
        swa = SlidingWindowConfig(n_heads=attention.n_heads, window=attention.window,
                                  rope_theta=attention.rope_theta, implementation=attention.implementation)
        self.attn = SlidingWindowAttention(d_model, swa, rngs=rngs)

    def __call__(self, x: Hidden) -> Hidden:
        return self.attn(self.memory(x))

    def init_state(self, batch_size: int, max_len: int) -> MemoryAsLayerState:
        return MemoryAsLayerState(self.memory.init_state(batch_size, max_len),
                                  self.attn.init_state(batch_size, max_len))

    def prefill(self, state: MemoryAsLayerState, x: Hidden) -> tuple[MemoryAsLayerState, Hidden]:
        memory, y = self.memory.prefill(state.memory, x)
        attn, o = self.attn.prefill(state.attn, y)
        return MemoryAsLayerState(memory, attn), o

    def decode_step(self, state: MemoryAsLayerState, x_t: HiddenStep) -> tuple[MemoryAsLayerState, HiddenStep]:
        memory, y_t = self.memory.decode_step(state.memory, x_t)
        attn, o_t = self.attn.decode_step(state.attn, y_t)
        return MemoryAsLayerState(memory, attn), o_t

    def state_size(self, seq_len: int) -> int:
        """Bytes per sequence: the memory layer's state plus the sliding window's keys and values."""
        return self.memory.state_size(seq_len) + self.attn.state_size(seq_len)
