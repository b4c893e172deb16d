"""Short causal depthwise convolution and the gated BaseConv token mixers built on it.

Paper: BASED, Arora et al., arXiv 2402.18668 (BaseConv);
Zoology, Arora et al., arXiv 2312.04927 (the MQAR models' first layer).
Reference: HazyResearch/based@32c1bd4 based/models/mixers/convolution.py (`BaseConv`, non-CUDA path);
HazyResearch/zoology@d88d6f5 zoology/mixers/base_conv.py (`BaseConv`).

Two variants, two registry names (their maths differs, so they are two classes, not a flag):
- `BaseConv` (BASED): u1, u2 = split(W_in x); y = W_out(SiLU(conv(u1)) * u2). Conv without bias.
- `ZoologyBaseConv`: y = conv(x) * (W x) + x. Conv with bias, no activation, residual inside.

Decoding keeps the last `kernel_size - 1` conv inputs: state size is constant in the sequence length.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.linear import linear


@dataclasses.dataclass(frozen=True, slots=True)
class ConvConfig:
    kernel_size: int = 3  # taps of the causal depthwise conv
    expand: int = 4  # BASED's in-projection width multiple (d -> expand*d, split in two halves)

    def __post_init__(self):
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        if self.expand < 2 or self.expand % 2:
            raise ValueError(f"expand must be an even number >= 2, got {self.expand}")


@jax.custom_vjp
def causal_conv(
    history: Float[Array, "B k1 D"], x: Float[Array, "B T D"], w: Float[Array, "k D"]
) -> Float[Array, "B T D"]:
    """y_t = sum_i w[i] * padded[t + i], padded = [history; x] (k1 = k - 1 earlier inputs): a causal depthwise conv.

    A custom VJP only for speed (the values and gradients are autodiff's, tests/layers/test_conv.py): autodiff's
    backward pads each tap's product to the padded length, then splits off the history, and XLA's CPU compiler fused
    that split with the transpose the projection's weight-gradient product wants, an untiled transposed write (~5 ms
    per [1024, 256] conv, a tenth of Titans' fwd+bwd at 1k). Here dx is formed directly at x's length, behind an
    optimization barrier, so any transpose is a separate copy.
    """
    k, T = w.shape[0], x.shape[1]
    padded = jnp.concatenate([history, x], axis=1)
    # k is tiny (3-4): a sum of shifted slices is as fast as lax.conv on CPU and reads like the formula.
    return sum(padded[:, i : i + T] * w[i][None, None] for i in range(k))


def _causal_conv_fwd(history, x, w):
    return causal_conv(history, x, w), (history, x, w)


def _causal_conv_bwd(res, dy):
    history, x, w = res
    k, T = w.shape[0], x.shape[1]
    padded = jnp.concatenate([history, x], axis=1)
    dw = jnp.stack([jnp.einsum("btd,btd->d", padded[:, i : i + T], dy) for i in range(k)])
    # d padded[s] = sum_i w[i] dy[s - i] over 0 <= s - i < T; x's part is padded[k-1:], so dx_t = sum_i w[i]
    # dy[t + k-1-i] (zero past the end)
    shifts = [min(k - 1 - i, T) for i in range(k)]
    dx = sum(jnp.pad(dy[:, s:] * w[i][None, None], ((0, 0), (0, s), (0, 0))) for i, s in enumerate(shifts))
    dx = jax.lax.optimization_barrier(dx)
    rows = [sum((w[i][None] * dy[:, s - i] for i in range(k) if 0 <= s - i < T), jnp.zeros_like(dy[:, 0]))
            for s in range(k - 1)]
    dh = jnp.stack(rows, axis=1) if rows else jnp.zeros_like(history)
    return dh.astype(history.dtype), dx, dw


causal_conv.defvjp(_causal_conv_fwd, _causal_conv_bwd)


class ShortConv(nnx.Module):
    """Causal depthwise conv: y_t[c] = sum_i w[i, c] x_{t-k+1+i}[c] (+ b[c]); zero history before t = 0."""

    def __init__(self, channels: int, kernel_size: int, *, use_bias: bool, rngs: nnx.Rngs):
        self.kernel_size = kernel_size
        self.channels = channels
        # PyTorch Conv1d's default init: U(-1/sqrt(k), 1/sqrt(k)) for a depthwise filter of k taps.
        bound = kernel_size**-0.5
        self.weight = nnx.Param(
            jax.random.uniform(rngs.params(), (kernel_size, channels), minval=-bound, maxval=bound),
            logical_axes=(None, "conv"),
            weight_decay=False,  # per-channel filter taps, like a norm scale: AdamW leaves them alone
        )
        self.bias = nnx.Param(jnp.zeros((channels,)), logical_axes=("conv",)) if use_bias else None

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        y, _ = self.with_history(jnp.zeros((x.shape[0], self.kernel_size - 1, self.channels), x.dtype), x)
        return y

    def with_history(
        self, history: Float[Array, "B k D"], x: Float[Array, "B T D"]
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B k D"]]:
        """Convolves x preceded by `history` (the previous k-1 inputs); returns y and the new history."""
        history_x = history.astype(x.dtype)
        y = causal_conv(history_x, x, self.weight[...].astype(x.dtype))
        padded = jnp.concatenate([history_x, x], axis=1)  # [B, k-1+T, D]; only its last k-1 rows are kept
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)[None, None]
        # The history keeps its own dtype (float32 from init_state): a bfloat16 step must not change the decode
        # carry's dtype under lax.scan.
        return y, padded[:, padded.shape[1] - (self.kernel_size - 1) :].astype(history.dtype)

    def init_state(self, batch_size: int) -> Float[Array, "B k D"]:
        return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), jnp.float32)

    def state_size(self) -> int:
        return (self.kernel_size - 1) * self.channels * 4


class _ConvMixer(nnx.Module):
    """Decoding shared by the conv mixers: the state is the conv history, and one step is a length-1 call."""

    conv: ShortConv

    def _mix(self, history, x):
        raise NotImplementedError

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        y, _ = self._mix(self.init_state(x.shape[0], 0), x)
        return y

    def init_state(self, batch_size: int, max_len: int) -> Float[Array, "B k D"]:
        del max_len  # constant-size state
        return self.conv.init_state(batch_size)

    def prefill(self, state, x: Float[Array, "B T D"]):
        y, state = self._mix(state, x)
        return state, y

    def decode_step(self, state, x_t: Float[Array, "B D"]):
        y, state = self._mix(state, x_t[:, None])
        return state, y[:, 0]

    def state_size(self, seq_len: int) -> int:
        del seq_len
        return self.conv.state_size()


class BaseConv(_ConvMixer):
    """BASED's gated short convolution (no residual inside; the block adds it)."""

    def __init__(self, d_model: int, config: ConvConfig, *, rngs: nnx.Rngs):
        inner = config.expand * d_model // 2
        self.in_proj = linear(d_model, 2 * inner, ("embed", "mlp"), rngs, use_bias=True)
        self.conv = ShortConv(inner, config.kernel_size, use_bias=False, rngs=rngs)
        self.out_proj = linear(inner, d_model, ("mlp", "embed"), rngs, use_bias=True)

    def _mix(self, history, x):
        u1, u2 = jnp.split(self.in_proj(x), 2, axis=-1)
        c, history = self.conv.with_history(history, u1)
        return self.out_proj(jax.nn.silu(c) * u2), history


class ZoologyBaseConv(_ConvMixer):
    """Zoology's BaseConv: y = conv(x) * (W x + b) + x."""

    def __init__(self, d_model: int, config: ConvConfig, *, rngs: nnx.Rngs):
        self.projection = linear(d_model, d_model, ("embed", "mlp"), rngs, use_bias=True)
        self.conv = ShortConv(d_model, config.kernel_size, use_bias=True, rngs=rngs)

    def _mix(self, history, x):
        c, history = self.conv.with_history(history, x)
        return c * self.projection(x) + x, history
