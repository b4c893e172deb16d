"""SwiGLU feed-forward block (Shazeer, arXiv 2002.05202), as in Llama: W_down(SiLU(x W_gate) * (x W_up))."""

import dataclasses

import jax
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.linear import linear


@dataclasses.dataclass(frozen=True, slots=True)
class MLPConfig:
    kind: str = "swiglu"  # "swiglu"; "sglu" (TransNormerLLM, no activation); "none": mixer-only blocks (Zoology)
    hidden: int | None = None  # F; None = 8/3 * d_model rounded up to a multiple of 16 (Llama)

    def __post_init__(self):
        if self.kind not in ("swiglu", "sglu", "none"):
            raise ValueError(f"mlp.kind must be 'swiglu', 'sglu' or 'none', got {self.kind!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"mlp.hidden must be positive, got {self.hidden}")

    def hidden_size(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        return -(-8 * d_model // 3 // 16) * 16


class SwiGLU(nnx.Module):
    """Llama's MLP, `SwiGLU(d_model, hidden, *, rngs)`: x [..., D] -> [..., D].

    Attributes:
      gate, up: [D, F] ("embed", "mlp").
      down: [F, D] ("mlp", "embed").
    """

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.gate = linear(d_model, hidden, ("embed", "mlp"), rngs)
        self.up = linear(d_model, hidden, ("embed", "mlp"), rngs)
        self.down = linear(hidden, d_model, ("mlp", "embed"), rngs)

    def __call__(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
