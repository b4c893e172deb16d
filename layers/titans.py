"""Titans' neural long-term memory (LMM) as a token mixer: a per-head memory MLP trained at test time.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663, §3.1, §3.3, §4.4.
The op (pallas_kernels/titans) holds the maths; this layer produces its inputs:

- q, k, v: linear projections, each followed by a causal depthwise convolution (kernel 4) and SiLU (§4.4); q and k
  l2-normalised per head.
- θ_t = max_lr · σ(x_t W_θ + b_θ) per token and head; η_n = σ(x̄_n W_η + b_η) and α_n = σ(x̄_n W_α + b_α) per chunk
  and head from the chunk's mean input x̄_n (titans-pytorch's AveragePool).
- Per-head memory MLP of `depth` L weight matrices starting from learned w1..wL, GELU between them (the paper's
  §3.1 deep memory; its §5.5 studies L = 1..4): L = 2 (the default) is M_W(x) = gelu(x w1) w2 with w1 [H, K, F],
  w2 [H, F, K] (F = expansion·K); deeper memories add w2..w(L-1) [H, F, F]; L = 1 is the linear memory x w1,
  w1 [H, K, K].
- Output: each head's retrieval scaled by a gate σ(x W_g) [B, T, H] (titans-pytorch's retrieve gate), heads merged
  by a linear map back to d_model.
- Persistent memory (§3.3): `n_persistent` learned tokens are stored into the memory before the input, so every
  query sees what they wrote; their own outputs are dropped.

Choices where the paper is silent: kernel 4, expansion 4, max_lr 0.1
(train_mac.py), chunk 16 / mini-batch 64 by default, gate biases initialised so that θ, η and α start near
σ(-2), σ(2) and σ(-4) (a usable memory from step 0 rather than 0.5 everywhere). `max_grad_norm` (off by default)
soft-clamps each chunk gradient: the plain update can diverge at max_lr 1.0 (pallas_kernels/titans/README.md).

Decoding: the state is the op's `MemoryState` (constant size), the three conv histories, and the running sum of the
open chunk's inputs (for its η / α when it completes).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.axes import Hidden, HiddenStep
from effarch.layers.conv import ShortConv
from effarch.layers.linear import linear
from effarch.pallas_kernels.titans import (
    MemoryState,
    neural_memory_init_state,
    neural_memory_scan,
    neural_memory_step,
)


@dataclasses.dataclass(frozen=True, slots=True)
class NeuralMemoryConfig:
    n_heads: int = 4  # H; head dim K = d_model // H
    expansion: int = 4  # F = expansion * K: the memory MLP's hidden width
    depth: int = 2  # L: the memory MLP's weight matrices (1: linear memory; 2: one hidden layer, as before)
    chunk_size: int = 16  # C: tokens per memory update
    batch_size: int | None = 64  # tokens between refreshes of the gradient point (multiple of C); None: never
    max_lr: float = 0.1  # θ = max_lr * sigmoid(...)
    conv_kernel: int = 4  # causal depthwise conv after the q, k, v projections
    n_persistent: int = 0  # N_p learned tokens stored before the input
    # Soft clamp of each chunk gradient's norm (neural_memory_scan's max_grad_norm); None: the paper's update
    max_grad_norm: float | None = None
    implementation: str | None = None  # neural_memory_scan backend

    def __post_init__(self):
        for name in ("n_heads", "expansion", "depth", "chunk_size", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"titans.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size is not None and (self.batch_size < 1 or self.batch_size % self.chunk_size):
            raise ValueError(f"titans.batch_size={self.batch_size} must be a positive multiple of "
                             f"titans.chunk_size={self.chunk_size} (or null)")
        if not self.max_lr > 0:
            raise ValueError(f"titans.max_lr must be positive, got {self.max_lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"titans.max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.n_persistent < 0:
            raise ValueError(f"titans.n_persistent must be >= 0, got {self.n_persistent}")


class NeuralMemoryState(NamedTuple):
    memory: MemoryState
    conv: tuple  # histories of the q, k, v convolutions, [B, kernel-1, d_model] each
    chunk_sum: Float[Array, "B D"]  # sum of the open chunk's inputs (float32)


class NeuralMemory(nnx.Module):
    """Titans LMM mixer: [B, T, d_model] -> [B, T, d_model]. Implements the `Mixer` protocol."""

    def __init__(self, d_model: int, config: NeuralMemoryConfig, *, rngs: nnx.Rngs):
        if d_model % config.n_heads:
            raise ValueError(f"titans.n_heads={config.n_heads} must divide d_model={d_model}")
        self.config, self.d_model = config, d_model
        H, K = config.n_heads, d_model // config.n_heads
        self.head_dim, F = K, config.expansion * K
        self.q_proj, self.k_proj, self.v_proj = (linear(d_model, d_model, ("embed", "heads"), rngs) for _ in range(3))
        self.convs = nnx.List([ShortConv(d_model, config.conv_kernel, use_bias=False, rngs=rngs) for _ in range(3)])
        self.lr_proj = linear(d_model, H, ("embed", None), rngs, use_bias=True, bias_init=-2.0)
        self.momentum_proj = linear(d_model, H, ("embed", None), rngs, use_bias=True, bias_init=2.0)
        self.decay_proj = linear(d_model, H, ("embed", None), rngs, use_bias=True, bias_init=-4.0)
        self.gate_proj = linear(d_model, H, ("embed", None), rngs)
        self.out_proj = linear(d_model, d_model, ("heads", "embed"), rngs)
        xavier = nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        widths = (K, *(F,) * (config.depth - 1), K)  # titans-pytorch's MemoryMLP: dim, hidden x (depth - 1), dim
        self.weight_names = tuple(f"w{i + 1}" for i in range(config.depth))  # the op's names, w1..wL
        for name, d_in, d_out in zip(self.weight_names, widths[:-1], widths[1:], strict=True):
            setattr(self, name, nnx.Param(xavier(rngs.params(), (H, d_in, d_out)), logical_axes=("heads", None, None)))
        self.persistent = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.n_persistent, d_model)),
                                     logical_axes=(None, "embed")) if config.n_persistent else None)

    def _params(self):
        return {name: getattr(self, name)[...] for name in self.weight_names}

    def memory_size(self) -> int:
        """Elements of one copy of the memory weights, all heads."""
        return sum(getattr(self, name)[...].size for name in self.weight_names)

    def _heads(self, x):
        return x.reshape(*x.shape[:2], self.config.n_heads, self.head_dim)

    def _features(self, x: Hidden, conv_state: tuple):
        """q, k, v [B, T, H, K] and θ [B, T, H]; the conv histories after x."""
        outs, new_conv = [], []
        for proj, conv, hist in zip((self.q_proj, self.k_proj, self.v_proj), self.convs, conv_state, strict=True):
            y, h = conv.with_history(hist, proj(x))
            outs.append(self._heads(jax.nn.silu(y)))
            new_conv.append(h)
        q, k, v = outs
        q, k = (z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6) for z in (q, k))
        lr = self.config.max_lr * jax.nn.sigmoid(self.lr_proj(x))
        return q, k, v, lr, tuple(new_conv)

    def _chunk_gates(self, x: Hidden, chunk_sum, pos: int):
        """η, α [B, N, H] of the chunks completing over x (the open chunk's carried input sum included) and the new
        open sum. `pos` (a Python int) is the position before x."""
        C = self.config.chunk_size
        r, T = pos % C, x.shape[1]
        xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (r, 0), (0, 0)))
        xf = xf.at[:, 0].add(chunk_sum if r else 0.0)  # the open chunk's earlier tokens, as one row
        n = (r + T) // C
        means = xf[:, : n * C].reshape(x.shape[0], n, C, x.shape[-1]).sum(2) / C
        open_sum = xf[:, n * C :].sum(1)
        return jax.nn.sigmoid(self.momentum_proj(means)), jax.nn.sigmoid(self.decay_proj(means)), open_sum

    def _output(self, y: Float[Array, "B T H K"], x: Hidden) -> Hidden:
        y = y * jax.nn.sigmoid(self.gate_proj(x))[..., None]
        return self.out_proj(y.reshape(*y.shape[:2], self.d_model))

    def _run(self, state: NeuralMemoryState, x: Hidden):
        pos = state.memory.pos
        if not isinstance(pos, int):
            raise ValueError("NeuralMemory.prefill needs a state whose position is a Python int (from init_state or a "
                             "previous prefill); continue a decode with decode_step")
        q, k, v, lr, conv = self._features(x, state.conv)
        eta, alpha, open_sum = self._chunk_gates(x, state.chunk_sum, pos)
        cfg = self.config
        y, memory = neural_memory_scan(self._params(), k, v, q, lr, eta, alpha, chunk_size=cfg.chunk_size,
                                       batch_size=cfg.batch_size, implementation=cfg.implementation,
                                       initial_state=state.memory, return_state=True,
                                       max_grad_norm=cfg.max_grad_norm)
        return NeuralMemoryState(memory, conv, open_sum), y

    def _empty_state(self, batch_size: int, dtype=jnp.float32) -> NeuralMemoryState:
        conv = tuple(jnp.zeros((batch_size, self.config.conv_kernel - 1, self.d_model), dtype) for _ in range(3))
        return NeuralMemoryState(neural_memory_init_state(self._params(), batch_size), conv,
                                 jnp.zeros((batch_size, self.d_model), jnp.float32))

    def _with_persistent(self, state: NeuralMemoryState) -> NeuralMemoryState:
        if self.persistent is None:
            return state
        p = jnp.broadcast_to(self.persistent[...], (state.chunk_sum.shape[0], *self.persistent.shape))
        state, _ = self._run(state, p)
        return state

    def __call__(self, x: Hidden) -> Hidden:
        state = self._with_persistent(self._empty_state(x.shape[0], x.dtype))
        _, y = self._run(state, x)
        return self._output(y, x)

    def init_state(self, batch_size: int, max_len: int) -> NeuralMemoryState:
        """The state after the persistent tokens; `max_len` is unused (constant-size state)."""
        del max_len
        return self._with_persistent(self._empty_state(batch_size))

    def prefill(self, state: NeuralMemoryState, x: Hidden) -> tuple[NeuralMemoryState, Hidden]:
        state, y = self._run(state, x)
        return state, self._output(y, x)

    def decode_step(self, state: NeuralMemoryState, x_t: HiddenStep) -> tuple[NeuralMemoryState, HiddenStep]:
        cfg, x = self.config, x_t[:, None]
        q, k, v, lr, conv = self._features(x, state.conv)
        chunk_sum = state.chunk_sum + x_t.astype(jnp.float32)
        mean = chunk_sum / cfg.chunk_size  # read only when this token completes the chunk
        eta, alpha = jax.nn.sigmoid(self.momentum_proj(mean)), jax.nn.sigmoid(self.decay_proj(mean))
        memory, y = neural_memory_step(state.memory, k[:, 0], v[:, 0], q[:, 0], lr[:, 0], eta, alpha,
                                       chunk_size=cfg.chunk_size, batch_size=cfg.batch_size,
                                       max_grad_norm=cfg.max_grad_norm)
        complete = memory.pos % cfg.chunk_size == 0
        chunk_sum = jnp.where(complete, jnp.zeros_like(chunk_sum), chunk_sum)
        return NeuralMemoryState(memory, conv, chunk_sum), self._output(y[:, None], x)[:, 0]

    def state_size(self, seq_len: int) -> int:
        """Bytes per sequence: W, S, Wref and the open gradient (4 weight sets), the conv histories, the chunk sum."""
        del seq_len
        weights = 4 * self.memory_size() * 4
        conv = 3 * (self.config.conv_kernel - 1) * self.d_model * 4
        return weights + conv + self.d_model * 4 + 4
