"""BASED Taylor linear-attention token mixer.

Paper: Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff",
arXiv 2402.18668, §3.1.
Reference: HazyResearch/based@32c1bd4, based/models/mixers/linear_attention.py (`LinearAttention`);
HazyResearch/zoology@d88d6f5, zoology/mixers/based.py (`Based`).

Choices:
- q and k are projected to H heads of feature_dim F each and v to H heads of d_model / H, so every q/k head has its
  own value head (not fla's layer, which splits q/k with head_dim);
- no biases, no RoPE, no q/k normalisation; output = concat(heads) -> out_proj;
- eps = 1e-6 (fla); based and zoology use 1e-12;
- the 1/sqrt(F) scale is applied inside the kernel (s = q . k / sqrt(F)), as based's `TaylorExp` does;
- decoding keeps the recurrent state (sum phi(k) v^T, sum phi(k)) of H (1 + F + F(F+1)/2)(head_dim + 1) floats
  (symmetric Taylor features: 153 per head at F = 16, not 273),
  independent of the sequence length; prefill computes it with the chunked pass.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.linear import linear
from effarch.pallas_kernels import based as based_op


@dataclasses.dataclass(frozen=True, slots=True)
class BasedConfig:
    feature_dim: int = 16  # F: per-head q/k dimension fed to the Taylor feature map (paper: 16)
    n_heads: int = 2  # H: heads; value head dim is d_model / H (paper: 16 at d = 1024; CPU scale: 1-2)
    eps: float = 1e-6  # added to the normaliser
    chunk_size: int = 64  # C: tokens per chunk of the chunked ("xla") path
    implementation: str | tuple[str, ...] | None = None  # op backend, see pallas_kernels/based/api.py

    def __post_init__(self):
        if self.feature_dim < 1:
            raise ValueError(f"based.feature_dim must be positive, got {self.feature_dim}")
        if self.n_heads < 1:
            raise ValueError(f"based.n_heads must be positive, got {self.n_heads}")
        if not self.eps >= 0:
            raise ValueError(f"based.eps must be non-negative, got {self.eps}")
        if self.chunk_size < 1:
            raise ValueError(f"based.chunk_size must be positive, got {self.chunk_size}")


class BasedLinearAttention(nnx.Module):
    """Causal Taylor linear attention: y = out_proj(concat_h BASED(q_h, k_h, v_h)).

    Attributes:
      q_proj, k_proj: d_model -> H * F.
      v_proj: d_model -> H * head_dim, head_dim = d_model / H.
      out_proj: H * head_dim -> d_model.
    """

    def __init__(self, d_model: int, config: BasedConfig, *, rngs: nnx.Rngs):
        if d_model % config.n_heads:
            raise ValueError(f"based.n_heads={config.n_heads} must divide d_model={d_model}")
        self.config = config
        self.d_model = d_model
        self.head_dim = d_model // config.n_heads
        hf = config.n_heads * config.feature_dim
        self.q_proj = linear(d_model, hf, ("embed", "heads"), rngs)
        self.k_proj = linear(d_model, hf, ("embed", "heads"), rngs)
        self.v_proj = linear(d_model, config.n_heads * self.head_dim, ("embed", "heads"), rngs)
        self.out_proj = linear(config.n_heads * self.head_dim, d_model, ("heads", "embed"), rngs)

    def _qkv(self, x: Float[Array, "B T D"]):
        b, t, _ = x.shape
        h, f = self.config.n_heads, self.config.feature_dim
        q = self.q_proj(x).reshape(b, t, h, f)
        k = self.k_proj(x).reshape(b, t, h, f)
        v = self.v_proj(x).reshape(b, t, h, self.head_dim)
        return q, k, v

    def _out(self, o: Float[Array, "B T H V"]) -> Float[Array, "B T D"]:
        b, t = o.shape[:2]
        return self.out_proj(o.reshape(b, t, self.config.n_heads * self.head_dim))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        q, k, v = self._qkv(x)
        cfg = self.config
        o = based_op.based_linear_attention(
            q, k, v, eps=cfg.eps, chunk_size=cfg.chunk_size, implementation=cfg.implementation
        )
        return self._out(o)

    def init_state(self, batch_size: int, max_len: int) -> based_op.BasedState:
        """Empty recurrent state; `max_len` is unused because the state does not grow."""
        del max_len
        return based_op.based_init_state(batch_size, self.config.n_heads, self.config.feature_dim, self.head_dim)

    def decode_step(
        self, state: based_op.BasedState, x_t: Float[Array, "B D"]
    ) -> tuple[based_op.BasedState, Float[Array, "B D"]]:
        q, k, v = self._qkv(x_t[:, None])
        state, o_t = based_op.based_decode_step(state, q[:, 0], k[:, 0], v[:, 0], eps=self.config.eps)
        return state, self._out(o_t[:, None])[:, 0]

    def prefill(
        self, state: based_op.BasedState, x: Float[Array, "B T D"]
    ) -> tuple[based_op.BasedState, Float[Array, "B T D"]]:
        """Runs a prompt from `state` with the chunked pass; returns (state after it, y [B, T, D])."""
        q, k, v = self._qkv(x)
        o, state = based_op.based_prefill(
            q, k, v, initial_state=state, eps=self.config.eps, chunk_size=self.config.chunk_size,
            implementation=self.config.implementation,
        )
        return state, self._out(o)

    def state_size(self, seq_len: int) -> int:
        """Bytes of float32 state per sequence: H * P * (head_dim + 1) * 4, P = 1 + F + F(F+1)/2; constant in T."""
        del seq_len
        p = based_op.feature_dim_expanded(self.config.feature_dim)
        return self.config.n_heads * p * (self.head_dim + 1) * jnp.dtype(jnp.float32).itemsize
