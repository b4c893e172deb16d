"""MoH: multi-head attention as mixture-of-head attention (Jin, Zhu, Yuan, Yan, arXiv 2410.11842).

Each token uses the n_shared shared heads (always active) plus the top_k of the E = n_heads - n_shared routed
heads that its router picks, and weights every active head by a gate before the output projection:
y_t = Σ_h g_th H_th W_O^h with g_th = 0 for the other heads. Keys and values are computed (and cached) for every
head, because other tokens may pick them. Routing is token-wise on the query token, so a causal language model
applies it to causal attention outputs.

Reference: SkyworkAI/MoH@66bb340, MoH-DiT/models.py::MoHAttention (learned router) and
MoH-LLaMA3/Inference_code/modeling_llama.py (parameter-free router).

Choices:
- router "learned", default scaling = the released code: routed gates renormalised over the selected
  heads times top_k, shared gates softmax(W_s x) times n_shared, two-stage weights softmax(W_h x) times 2, load
  balance E·Σ_i f_i P_i. At uniform gates every active head weighs 1, i.e. the layer starts as plain MHA. With
  top_k = 1 the routed gate is p / p = 1, so W_r learns from the load-balance loss only (as in the released code).
  `paper_scaling=True` gives paper eq. 3-5 instead: g = α1·softmax(W_s x) on shared heads, α2·softmax(W_r x) on
  the selected routed heads (not renormalised), L_b = Σ_i f_i P_i;
- router "parameter_free" (MoH-LLaMA3): routed logits are the query-head norms ‖q_h‖ divided by their
  standard deviation over the routed heads (ddof 0: top-k does not depend on the estimator),
  softmax, top-k; the gates are binary (shared 1, selected routed 1) with the straight-through gradient of paper
  eq. 9-10 (the forward value is exactly 1, the gradient goes to the softmax). Every weight is the baseline's, so
  `arches/convert_moh.py` turns a trained Attention model into this one; with top_k = E it equals the baseline;
- top-k ties go to the lower head index (jax.lax.top_k), so routing is deterministic;
- the load-balance loss is stored in an `AuxLoss` variable (layers/aux_loss.py) on every parallel call; the training
  loop adds it with weight β (train.aux_loss_weight, default 0.01). f_i and P_i are means over all B·T tokens;
- `implementation="sparse"` computes only the active (token, head) pairs (pallas_kernels/moh/xla.py), the default
  "dense" computes every head and zeroes the inactive ones; both are tested against the reference;
- the projections, RoPE, GQA grouping and the KV cache are those of `layers/attention.py` (this layer subclasses
  it, so a baseline checkpoint's q/k/v/o weights load unchanged); state_size is the full KV cache.
"""

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.aux_loss import zero_aux_loss
from effarch.layers.axes import Hidden, HiddenStep, State
from effarch.layers.linear import linear
from effarch.layers.lora import kernel_of
from effarch.layers.rope import ROPE_SCALING_FIELDS
from effarch.pallas_kernels.moh import mixture_of_heads_attention


@dataclasses.dataclass(frozen=True, slots=True)
class MoHConfig:
    n_heads: int = 4  # H = shared + routed heads
    n_shared: int = 2  # h_s: heads 0 .. h_s-1, active for every token (0: routed heads only)
    top_k: int = 1  # routed heads active per token, out of E = n_heads - n_shared
    router: Literal["learned", "parameter_free"] = "learned"  # W_r/W_s/W_h gates, or ‖q_h‖ norms (MoH-LLaMA3)
    paper_scaling: bool = False  # paper eq. 3-5 gates and loss instead of the released code's rescaling
    n_kv_heads: int | None = None  # as AttentionConfig: None = n_heads (MHA), else GQA / MQA
    head_dim: int | None = None  # K = V; None = d_model // n_heads
    rope: bool = True
    rope_theta: float = 10000.0
    # RoPE scaling, as AttentionConfig (so a converted Llama 3 checkpoint keeps its positions)
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    implementation: str | None = None  # mixture_of_heads_attention path: None/"dense", "sparse", "reference"
    block_size: int = 16  # pairs per block of the sparse path

    def __post_init__(self):
        if self.n_heads < 2:
            raise ValueError(f"moh.n_heads must be >= 2 (shared + routed heads), got {self.n_heads}")
        if not 0 <= self.n_shared < self.n_heads:
            raise ValueError(f"moh.n_shared={self.n_shared} must be in [0, n_heads={self.n_heads}): MoH needs at "
                             "least one routed head")
        if not 1 <= self.top_k <= self.n_heads - self.n_shared:
            raise ValueError(f"moh.top_k={self.top_k} must be in [1, n_heads - n_shared = "
                             f"{self.n_heads - self.n_shared}]")
        if self.block_size < 1:
            raise ValueError(f"moh.block_size must be positive, got {self.block_size}")
        try:
            self.attention_config()  # n_kv_heads, head_dim, rope_theta: the attention layer's checks
        except ValueError as e:
            raise ValueError(str(e).replace("attention.", "moh.", 1)) from None

    @property
    def n_routed(self) -> int:
        return self.n_heads - self.n_shared

    @property
    def n_active(self) -> int:
        return self.n_shared + self.top_k

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                               rope=self.rope, rope_theta=self.rope_theta, causal=True,
                               **{f: getattr(self, f) for f in ROPE_SCALING_FIELDS})


class Routing(NamedTuple):
    """Routing of one batch: active heads (shared first, then routed by rank), their gates, the load-balance loss and
    the routed heads' softmax."""

    heads: Int[Array, "B T A"]
    gates: Float[Array, "B T A"]
    aux: Float[Array, ""]
    probs: Float[Array, "B T E"]


def load_balance(probs_BTE: Float[Array, "B T E"], top_idx: Int[Array, "B T k"], paper_scaling: bool):
    """Σ_i f_i P_i (paper) or E·Σ_i f_i P_i (code): f_i = share of tokens selecting head i, P_i = mean probability."""
    E = probs_BTE.shape[-1]
    mask_BTE = jnp.sum(jax.nn.one_hot(top_idx, E, dtype=jnp.float32), axis=-2)
    f_E = jnp.mean(mask_BTE, axis=(0, 1))
    p_E = jnp.mean(probs_BTE, axis=(0, 1))
    loss = jnp.sum(f_E * p_E)
    return loss if paper_scaling else E * loss


class MoHAttention(Attention):
    """Causal self-attention mixer (layers/axes.py Mixer) with mixture-of-head routing.

    Attributes:
      q_proj, k_proj, v_proj, o_proj: as Attention.
      router: W_r [D, E] ("embed", None); learned router only.
      shared_router: W_s [D, h_s]; learned router with h_s > 1 (a single shared head has gate 1 before α1).
      stage_router: W_h [D, 2], the two-stage weights α; learned router with h_s > 0.
      load_balance: AuxLoss, the load-balance loss of the latest parallel call.
    """

    def __init__(self, d_model: int, config: MoHConfig, *, rngs: nnx.Rngs):
        try:
            super().__init__(d_model, config.attention_config(), rngs=rngs)
        except ValueError as e:  # Attention's errors name its own keys; the user wrote model.moh.*
            raise ValueError(str(e).replace("attention.", "moh.").replace("attention:", "moh:")) from None
        self.moh = config
        self.router = self.shared_router = self.stage_router = nnx.data(None)
        if config.router == "learned":
            self.router = linear(d_model, config.n_routed, ("embed", None), rngs)
            if config.n_shared > 1:
                self.shared_router = linear(d_model, config.n_shared, ("embed", None), rngs)
            if config.n_shared > 0:
                self.stage_router = linear(d_model, 2, ("embed", None), rngs)
        self.load_balance = zero_aux_loss()

    # --- routing ------------------------------------------------------------------------------------------------

    def route(self, x: Hidden, q: Float[Array, "B T H K"]) -> Routing:
        """Active heads [B, T, A] (shared first, then the top_k routed heads by rank) and their gates [B, T, A]."""
        c = self.moh
        B, T = x.shape[:2]
        if c.router == "learned":
            logits_BTE = self.router(x).astype(jnp.float32)
        else:
            norms_BTE = jnp.sqrt(jnp.sum(jnp.square(q[:, :, c.n_shared:].astype(jnp.float32)), axis=-1) + 1e-12)
            # Dividing by the spread across heads makes the softmax scale-free (the router has no temperature).
            logits_BTE = norms_BTE / (jnp.std(norms_BTE, axis=-1, keepdims=True) + 1e-6)
        probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
        top_p, top_idx = jax.lax.top_k(probs_BTE, c.top_k)
        aux = load_balance(probs_BTE, top_idx, c.paper_scaling)
        routed_heads = c.n_shared + top_idx

        shared_heads = jnp.broadcast_to(jnp.arange(c.n_shared, dtype=top_idx.dtype), (B, T, c.n_shared))
        heads = jnp.concatenate([shared_heads, routed_heads], axis=-1)
        if c.router == "parameter_free":
            # Straight-through (paper eq. 10): forward value exactly 1, gradient of the soft probability.
            routed = 1.0 + (top_p - jax.lax.stop_gradient(top_p))
            gates = jnp.concatenate([jnp.ones((B, T, c.n_shared), jnp.float32), routed], axis=-1)
            return Routing(heads, gates, aux, probs_BTE)

        if c.paper_scaling:
            routed = top_p
        else:
            denom = jnp.maximum(jnp.sum(top_p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
            routed = top_p / denom * c.top_k
        if c.n_shared == 0:
            return Routing(heads, routed, aux, probs_BTE)
        if self.shared_router is None:
            shared = jnp.ones((B, T, 1), jnp.float32)
        else:
            shared = jax.nn.softmax(self.shared_router(x).astype(jnp.float32), axis=-1)
        alpha_BT2 = jax.nn.softmax(self.stage_router(x).astype(jnp.float32), axis=-1)
        if not c.paper_scaling:
            shared, alpha_BT2 = shared * c.n_shared, alpha_BT2 * 2
        gates = jnp.concatenate([alpha_BT2[..., :1] * shared, alpha_BT2[..., 1:] * routed], axis=-1)
        return Routing(heads, gates, aux, probs_BTE)

    # --- attention --------------------------------------------------------------------------------------------

    def _w_o(self) -> Float[Array, "H V D"]:
        # kernel_of: a LoRA adapter on o_proj (layers/lora.py) is part of the matrix this reads
        return kernel_of(self.o_proj).reshape(self.config.n_heads, self.head_dim, self.d_model)

    def _mixture(self, q, k, v, routing: Routing, q_positions=None) -> Hidden:
        return mixture_of_heads_attention(
            q, k, v, routing.heads, routing.gates.astype(q.dtype), self._w_o().astype(q.dtype),
            q_positions=q_positions, block_size=self.moh.block_size, implementation=self.moh.implementation)

    def __call__(self, x: Hidden) -> Hidden:
        """Parallel form, x [B, T, D] -> [B, T, D]; also stores the load-balance loss in self.load_balance."""
        q, k, v = self.project_qkv(x, jnp.arange(x.shape[1]))
        routing = self.route(x, q)
        self.load_balance[...] = routing.aux
        return self._mixture(q, k, v, routing)

    def decode_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]:
        """One token x_t [B, D]; returns (state, y_t [B, D]). With a KV policy (set_kv_policy) every head attends
        over the entries the policy selects, and the routed heads' outputs are mixed as in the cached path."""
        if self.kv_policy is None:
            return super().decode_step(state, x_t)
        state, q, o_BHV = self.policy_step(state, x_t)
        routing = self.route(x_t[:, None], q[:, None])
        heads_BA, gates_BA = routing.heads[:, 0], routing.gates[:, 0].astype(o_BHV.dtype)
        o_BAV = jnp.take_along_axis(o_BHV, heads_BA[..., None], axis=1)
        w_BAVD = self._w_o().astype(o_BHV.dtype)[heads_BA]
        return state, jnp.einsum("BA,BAV,BAVD->BD", gates_BA, o_BAV, w_BAVD)

    def prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """Runs x [B, T, D] from position state["pos"] against the KV cache; with pos = 0 equals __call__(x).

        Past the cache end: ValueError eagerly, NaN outputs under jit (as Attention).
        """
        state, q, positions = self._write(state, x)
        routing = self.route(x, q)
        k, v = state["k"].astype(q.dtype), state["v"].astype(q.dtype)
        y = self._mixture(q, k, v, routing, q_positions=positions)
        return state, jnp.where(state["pos"] <= state["k"].shape[1], y, jnp.full((), jnp.nan, y.dtype))
