"""Lightning Attention-2 token mixer and SGLU channel mixer (the TransNormerLLM "GLA" + "SGLU" block pieces).

Papers: Lightning Attention-2, arXiv 2401.04658; TransNormerLLM, arXiv 2307.14995 (eq. 11, SRMSNorm, SGLU);
"Various Lengths, Constant Speed" (TNL), arXiv 2405.17381.
Reference: OpenNLPLab/lightning-attention@d15c385, examples/module/tnl_attn.py (TnlAttention) and
lightning_attn/ops/torch/srmsnorm.py (SimpleRMSNormTorch).

Choices:
- Q, K and V all go through SiLU, as in tnl_attn.py (the paper applies it to Q and K only).
- Output gate (choice): the low-rank sigmoid gate of tnl_attn.py, U = σ(W_up(W_down x)) with a d → head_dim → d
  bottleneck, by default; `output_gate="linear"` gives paper eq. 11's plain U = X W_u.
- The norm is SRMSNorm (paper), not tnl_attn.py's LayerNorm, and runs over the full H·head_dim width after the heads
  are merged, as both tnl_attn.py's LayerNorm(embed_dim) and the TransNormerLLM model code do.
- Decay rates follow the OpenNLPLab code convention (`tnl_decay`); they are a fixed function of
  (n_heads, layer_idx, n_layers), recomputed on each call, not parameters.
- No LRPE-d in the first layer.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.axes import Hidden, HiddenStep
from effarch.layers.linear import linear
from effarch.layers.norms import srms_norm
from effarch.pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_step,
    lightning_attention_with_state,
    tnl_decay,
)


@dataclasses.dataclass(frozen=True, slots=True)
class LightningConfig:
    n_heads: int = 4  # H; head_dim = d_model // n_heads, and the decay slopes depend on H
    block_size: int = 64  # C: tokens per block of the tiled kernel (the paper picks C ≈ head_dim)
    output_gate: str = "low_rank"  # "low_rank": σ(W_up W_down x) of tnl_attn.py; "linear": U = X W_u (eq. 11)
    norm_eps: float = 1e-6  # SRMSNorm epsilon (SimpleRMSNormTorch's default)
    implementation: str | tuple[str, ...] | None = None  # kernel path; see pallas_kernels/lightning/api.py

    def __post_init__(self):
        if self.n_heads < 1:
            raise ValueError(f"lightning.n_heads must be positive, got {self.n_heads}")
        if self.block_size < 1:
            raise ValueError(f"lightning.block_size must be positive, got {self.block_size}")
        if self.output_gate not in ("low_rank", "linear"):
            raise ValueError(f"lightning.output_gate must be 'low_rank' or 'linear', got {self.output_gate!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"lightning.norm_eps must be positive, got {self.norm_eps}")


class LightningAttention(nnx.Module):
    """TNL token mixer: O = SRMSNorm(lightning(SiLU(X W_q), SiLU(X W_k), SiLU(X W_v))) ⊙ U, then W_o.

    Attributes:
      config: the LightningConfig.
      n_heads, head_dim: H and K = V = d_model // H.
      layer_idx, n_layers: position in the stack; they set the fixed decay rates.
    """

    def __init__(self, d_model: int, config: LightningConfig, *, layer_idx: int, n_layers: int, rngs: nnx.Rngs):
        if d_model % config.n_heads:
            raise ValueError(f"lightning.n_heads={config.n_heads} must divide d_model={d_model}")
        # Validates layer_idx / n_layers now rather than on the first call.
        tnl_decay(config.n_heads, layer_idx, n_layers)
        self.config = config
        self.d_model = d_model
        self.n_heads = config.n_heads
        self.head_dim = d_model // config.n_heads
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.q_proj = linear(d_model, d_model, ("embed", "heads"), rngs)
        self.k_proj = linear(d_model, d_model, ("embed", "heads"), rngs)
        self.v_proj = linear(d_model, d_model, ("embed", "heads"), rngs)
        if config.output_gate == "low_rank":
            self.gate_down = linear(d_model, self.head_dim, ("embed", None), rngs)
            self.gate_up = linear(self.head_dim, d_model, (None, "heads"), rngs)
        else:
            self.gate_proj = linear(d_model, d_model, ("embed", "heads"), rngs)
        self.out_proj = linear(d_model, d_model, ("heads", "embed"), rngs)

    def decay(self) -> Float[Array, " H"]:
        """Per-head rates s_h of this layer (fixed, not trained)."""
        return tnl_decay(self.n_heads, self.layer_idx, self.n_layers)

    def _split_heads(self, x: Float[Array, "B T D"]) -> Float[Array, "B T H K"]:
        return x.reshape(*x.shape[:2], self.n_heads, self.head_dim)

    def _qkv(self, x: Hidden) -> tuple[Float[Array, "B T H K"], Float[Array, "B T H K"], Float[Array, "B T H K"]]:
        q, k, v = (self._split_heads(jax.nn.silu(proj(x))) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def _gate(self, x: Hidden) -> Hidden:
        if self.config.output_gate == "low_rank":
            return jax.nn.sigmoid(self.gate_up(self.gate_down(x)))
        return self.gate_proj(x)

    def _output(self, o: Float[Array, "B T H V"], x: Hidden) -> Hidden:
        merged = o.reshape(*o.shape[:2], self.d_model)
        return self.out_proj(srms_norm(merged, self.config.norm_eps) * self._gate(x))

    def __call__(self, x: Hidden) -> Hidden:
        """Parallel (training) form: [B, T, D] -> [B, T, D]."""
        q, k, v = self._qkv(x)
        cfg = self.config
        o = lightning_attention(q, k, v, self.decay(), block_size=cfg.block_size, implementation=cfg.implementation)
        return self._output(o, x)

    def init_state(self, batch_size: int, max_len: int) -> Float[Array, "B H K V"]:
        """The kv state before the first token, [B, H, K, V] float32; its size does not depend on max_len."""
        del max_len
        return jnp.zeros((batch_size, self.n_heads, self.head_dim, self.head_dim), jnp.float32)

    def prefill(self, state: Float[Array, "B H K V"], x: Hidden) -> tuple[Float[Array, "B H K V"], Hidden]:
        """Runs a prompt (or the next chunk) through the block algorithm from `state`; returns (state, y)."""
        q, k, v = self._qkv(x)
        cfg = self.config
        o, state = lightning_attention_with_state(
            q, k, v, self.decay(), state, block_size=cfg.block_size, implementation=cfg.implementation
        )
        return state, self._output(o, x)

    def decode_step(
        self, state: Float[Array, "B H K V"], x_t: HiddenStep
    ) -> tuple[Float[Array, "B H K V"], HiddenStep]:
        """One token: [B, D] -> [B, D], with the O(1) recurrent update of the [B, H, K, V] state."""
        x = x_t[:, None, :]
        q, k, v = self._qkv(x)
        state, o_t = lightning_attention_step(state, q[:, 0], k[:, 0], v[:, 0], self.decay())
        return state, self._output(o_t[:, None], x)[:, 0]

    def state_size(self, seq_len: int) -> int:
        """Bytes of decode state per sequence: H·K·V float32 values, whatever seq_len is."""
        del seq_len
        return self.n_heads * self.head_dim * self.head_dim * 4


class SGLU(nnx.Module):
    """TransNormerLLM channel mixer: O = [(X W_v) ⊙ (X W_u)] W_o, a GLU without an activation."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.v_proj = linear(d_model, hidden, ("embed", "mlp"), rngs)
        self.u_proj = linear(d_model, hidden, ("embed", "mlp"), rngs)
        self.out_proj = linear(hidden, d_model, ("mlp", "embed"), rngs)

    def __call__(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        return self.out_proj(self.v_proj(x) * self.u_proj(x))
