"""Titans MAG, memory as a gate (arXiv 2501.00663 §4.2): sliding-window attention gated by the neural memory.

    x̃ = [p_1 .. p_Np] || x,   y = SW-Attn*(x̃),   o = RMSNorm_a(y) ⊙ σ(RMSNorm_b(M(x̃)))

- M is the NeuralMemory layer (layers/titans.py) run over the sequence, per token store-then-retrieve; it stores the
  persistent tokens before the input (its `n_persistent`), so the memory branch of x̃ is exactly that layer.
- SW-Attn* is causal sliding-window attention (window `titans_attention.window`) in which every query also sees the
  persistent prefix (paper Fig. 3b). The same persistent tokens (the memory layer's parameter) feed both branches.

Choices where the paper (§4.2) is silent: the gate `⊗` is RMSNorm_a(y) ⊙ sigmoid(RMSNorm_b(m))
with learnable RMSNorm scales; persistent tokens have no position in attention (layers/titans_attention.py).

Decoding state: the memory layer's state, the last `window` rotated keys and values, and the position; constant size.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers.axes import Hidden, HiddenStep
from effarch.layers.norms import rms_norm
from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from effarch.layers.titans_attention import (
    TitansAttentionConfig,
    make_attention,
    persistent_key_values,
    window_prefix_attention,
)


class MemoryAsGateState(NamedTuple):
    memory: NeuralMemoryState
    k: Float[Array, "B W H K"]  # rotated keys of the last W tokens (oldest first)
    v: Float[Array, "B W H K"]
    pos: int | Int[Array, ""]  # tokens seen (persistent tokens not counted)


class MemoryAsGate(nnx.Module):
    """Titans MAG mixer: [B, T, d_model] -> [B, T, d_model]. Implements the `Mixer` protocol."""

    def __init__(self, d_model: int, memory: NeuralMemoryConfig, attention: TitansAttentionConfig, *,
                 rngs: nnx.Rngs):
        self.d_model, self.window = d_model, attention.window
        self.memory = NeuralMemory(d_model, memory, rngs=rngs)
        self.attn = make_attention(d_model, attention, rngs)
        self.norm_y = rms_norm(d_model, rngs=rngs)
        self.norm_m = rms_norm(d_model, rngs=rngs)

    def _attend(self, state: MemoryAsGateState, x: Hidden):
        B, T = x.shape[:2]
        q, k, v = self.attn.project_qkv(x, state.pos + jnp.arange(T))
        persistent = None if self.memory.persistent is None else self.memory.persistent[...]
        pk, pv = persistent_key_values(self.attn, persistent, B)
        o = window_prefix_attention(self.attn, q, k, v, state.k, state.v, state.pos, pk, pv)
        keys = jnp.concatenate([state.k, k.astype(state.k.dtype)], 1)[:, -self.window:]
        vals = jnp.concatenate([state.v, v.astype(state.v.dtype)], 1)[:, -self.window:]
        return keys, vals, self.attn.o_proj(o.reshape(B, T, -1))

    def _gate(self, y: Float[Array, "*B D"], m: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        return self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m))

    def __call__(self, x: Hidden) -> Hidden:
        _, o = self.prefill(self.init_state(x.shape[0], x.shape[1]), x)
        return o

    def init_state(self, batch_size: int, max_len: int) -> MemoryAsGateState:
        """The memory after the persistent tokens and an empty window; `max_len` is unused (constant size)."""
        H, K = self.attn.config.kv_heads, self.attn.head_dim
        empty = jnp.zeros((batch_size, self.window, H, K), jnp.float32)
        return MemoryAsGateState(self.memory.init_state(batch_size, max_len), empty, empty, 0)

    def prefill(self, state: MemoryAsGateState, x: Hidden) -> tuple[MemoryAsGateState, Hidden]:
        memory, m = self.memory.prefill(state.memory, x)
        k, v, y = self._attend(state, x)
        return MemoryAsGateState(memory, k, v, state.pos + x.shape[1]), self._gate(y, m)

    def decode_step(self, state: MemoryAsGateState, x_t: HiddenStep) -> tuple[MemoryAsGateState, HiddenStep]:
        memory, m_t = self.memory.decode_step(state.memory, x_t)
        k, v, y = self._attend(state, x_t[:, None])
        return MemoryAsGateState(memory, k, v, state.pos + 1), self._gate(y[:, 0], m_t)

    def state_size(self, seq_len: int) -> int:
        """Bytes per sequence: the memory layer's state and the window's float32 keys and values."""
        window = 2 * self.window * self.attn.config.kv_heads * self.attn.head_dim * 4
        return self.memory.state_size(seq_len) + window
