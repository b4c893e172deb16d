"""Sliding-window softmax attention token mixer (the SWA layer of BASED).

Paper: Arora et al., arXiv 2402.18668, §3.2 (window 64, one tensor-core tile).
Reference: HazyResearch/based@32c1bd4, based/models/mixers/slide_attention.py (`SlidingAttention`).

Choices (conventions: pallas_kernels/sliding_window/README.md):
- window w means exactly w keys: query t sees t - w < j <= t. based's `window_size=W` gives W // 2 + 1 keys and
  zoology's `block_size=w` gives w + 1; pass the key count you want as `window`;
- RoPE (rotate-half, full head dim) on q and k, scale head_dim^-1/2, q/k/v/o projections without bias;
- grouped-query attention when n_kv_heads < n_heads;
- decoding keeps a ring buffer of exactly `window` (k, v) entries plus the position counter, so the state stops
  growing once the sequence is longer than the window.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.linear import linear
from effarch.layers.rope import apply_rope
from effarch.pallas_kernels import sliding_window as swa_op


@dataclasses.dataclass(frozen=True, slots=True)
class SlidingWindowConfig:
    n_heads: int = 4  # H: query heads; head_dim = d_model / H
    n_kv_heads: int | None = None  # Hkv: key/value heads (GQA); None means n_heads
    window: int = 64  # keys per query, t - window < j <= t (paper: 64)
    rope_theta: float = 10000.0  # RoPE base
    implementation: str | tuple[str, ...] | None = None  # op backend, see pallas_kernels/sliding_window/api.py

    def __post_init__(self):
        if self.n_heads < 1:
            raise ValueError(f"sliding_window.n_heads must be positive, got {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"sliding_window.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.window < 1:
            raise ValueError(f"sliding_window.window must be positive, got {self.window}")
        if not self.rope_theta > 0:
            raise ValueError(f"sliding_window.rope_theta must be positive, got {self.rope_theta}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


class SlidingWindowAttention(nnx.Module):
    """Causal local softmax attention with RoPE and GQA.

    Attributes:
      q_proj: d_model -> H * head_dim.
      k_proj, v_proj: d_model -> Hkv * head_dim.
      o_proj: H * head_dim -> d_model.
    """

    def __init__(self, d_model: int, config: SlidingWindowConfig, *, rngs: nnx.Rngs):
        if d_model % config.n_heads:
            raise ValueError(f"sliding_window.n_heads={config.n_heads} must divide d_model={d_model}")
        self.config = config
        self.d_model = d_model
        self.head_dim = d_model // config.n_heads
        if self.head_dim % 2:
            raise ValueError(f"sliding_window: RoPE needs an even head dim, got d_model / n_heads = {self.head_dim}")
        hkv = config.kv_heads
        self.q_proj = linear(d_model, config.n_heads * self.head_dim, ("embed", "heads"), rngs)
        self.k_proj = linear(d_model, hkv * self.head_dim, ("embed", "kv_heads"), rngs)
        self.v_proj = linear(d_model, hkv * self.head_dim, ("embed", "kv_heads"), rngs)
        self.o_proj = linear(config.n_heads * self.head_dim, d_model, ("heads", "embed"), rngs)

    def _qkv(self, x: Float[Array, "B T D"], positions):
        b, t, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).reshape(b, t, cfg.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.kv_heads, self.head_dim)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        return q, k, v

    def _out(self, o: Float[Array, "B T H K"]) -> Float[Array, "B T D"]:
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.config.n_heads * self.head_dim))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
        o = swa_op.sliding_window_attention(
            q, k, v, window=self.config.window, implementation=self.config.implementation
        )
        return self._out(o)

    def init_state(self, batch_size: int, max_len: int) -> swa_op.SlidingWindowCache:
        """Empty ring buffer of `window` entries (float32); `max_len` is unused, the buffer never grows."""
        del max_len
        return swa_op.sliding_window_init_cache(batch_size, self.config.window, self.config.kv_heads, self.head_dim)

    def decode_step(
        self, state: swa_op.SlidingWindowCache, x_t: Float[Array, "B D"]
    ) -> tuple[swa_op.SlidingWindowCache, Float[Array, "B D"]]:
        q, k, v = self._qkv(x_t[:, None], state.pos[None])
        state, o_t = swa_op.sliding_window_decode_step(state, q[:, 0], k[:, 0], v[:, 0])
        return state, self._out(o_t[:, None])[:, 0]

    def prefill(
        self, state: swa_op.SlidingWindowCache, x: Float[Array, "B T D"]
    ) -> tuple[swa_op.SlidingWindowCache, Float[Array, "B T D"]]:
        """Runs a prompt after the `state.pos` cached tokens; returns (updated ring buffer, y [B, T, D])."""
        q, k, v = self._qkv(x, state.pos + jnp.arange(x.shape[1]))
        state, o = swa_op.sliding_window_prefill(state, q, k, v)
        return state, self._out(o)

    def state_size(self, seq_len: int) -> int:
        """Bytes per sequence of the keys and values a query needs after `seq_len` tokens.

        2 * min(seq_len, window) * Hkv * head_dim * 4: it grows until seq_len = window and is constant after. The
        buffer `init_state` allocates always has `window` slots (the constant value). The int32 position counter is
        left out, as in `layers/attention.py`, so SWA with window >= seq_len reports the same bytes as attention.
        """
        n_kv = min(seq_len, self.config.window)
        return 2 * n_kv * self.config.kv_heads * self.head_dim * jnp.dtype(jnp.float32).itemsize
