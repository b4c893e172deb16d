"""Softmax multi-head attention: the baseline token mixer (Vaswani et al., arXiv 1706.03762).

Covers the four patterns of the CAB benchmark: causal and non-causal, self and cross attention. KV heads are
shared by groups of query heads: MHA (n_kv_heads = n_heads), GQA (arXiv 2305.13245) and MQA (n_kv_heads = 1,
arXiv 1911.02150). Rotary position embeddings (RoFormer, arXiv 2104.09864) rotate q and k in self attention.
The attention itself is `pallas_kernels.attention.dot_product_attention` (jax.nn / cuDNN, with a jnp oracle).

Choices:
- q/k/v/o projections have no bias (Llama);
- query head h reads KV head h // (n_heads // n_kv_heads), the grouping of jax.nn.dot_product_attention;
- cross attention uses no RoPE: query and memory positions are not on one axis;
- `rope_scaling="llama3"` applies Llama 3.1's frequency scaling, so Hugging Face Llama checkpoints import exactly
  (arches/hf_llama.py);
- decoding keeps a KV cache of `max_len` slots with one position counter shared by the batch, and attends to the
  slots <= pos through a boolean mask, so every step has the same shapes and one jit trace serves all steps;
- a decode-time KV policy (layers/kv_policies/, set with `set_kv_policy`; configuration, not parameters) makes each
  decode step read only the cache entries the policy selects; prefill stays dense;
- `duo_gates` adds DuoAttention's trainable gate per KV head (Xiao et al., arXiv 2410.10819 §3;
  mit-han-lab/duo-attention `duo_attn/patch/llama.py`): each head's output is α·full + (1 − α)·streaming, the
  streaming attention reading the first `duo_sink` tokens and the last `duo_window` (token-level, the official SDPA
  variant's mask). Every path mixes (parallel, prefill, decode), so the gated model is one function; under a KV
  policy the gates are ignored and prefill is dense, the policy deciding what decode reads (`--kv-policy duo` makes
  the gates hard: layers/kv_policies/duo.py). The streaming half is the masked dense op, not a sparse kernel: the
  gated model is a training construct that computes the full attention anyway.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers.axes import Hidden, HiddenStep, State
from effarch.layers.linear import linear
from effarch.layers.rope import apply_rope, scaled_rope_frequencies
from effarch.pallas_kernels.attention import dot_product_attention


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionConfig:
    n_heads: int = 4  # H query heads
    n_kv_heads: int | None = None  # Hkv key/value heads; None = n_heads (MHA), 1 = MQA, else GQA
    head_dim: int | None = None  # K = V; None = d_model // n_heads
    rope: bool = True  # rotary embeddings on q and k (self attention only)
    rope_theta: float = 10000.0  # RoPE base
    # RoPE frequency scaling: "none", or "llama3" (Llama 3.1 long context; layers/rope.py::llama3_frequencies)
    # with the four parameters below, named as in Hugging Face's rope_scaling.
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192  # original_max_position_embeddings
    causal: bool = True  # token t sees tokens <= t; must be False for cross attention
    implementation: str | None = None  # dot_product_attention backend; None = platform default
    # DuoAttention (module docstring): a gate per KV head, init 1, mixing full and streaming attention; the
    # streaming part reads the first duo_sink tokens and the last duo_window ones (the current one included). The
    # defaults are the paper's training sizes (128 + 256, official scripts/train.sh).
    duo_gates: bool = False
    duo_sink: int = 128
    duo_window: int = 256

    def __post_init__(self):
        if self.n_heads < 1:
            raise ValueError(f"attention.n_heads must be positive, got {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"attention.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"attention.head_dim must be positive, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"attention.rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling not in ("none", "llama3"):
            raise ValueError(f"attention.rope_scaling must be 'none' or 'llama3', got {self.rope_scaling!r}")
        if self.rope_scaling_factor <= 0:
            raise ValueError(f"attention.rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"attention.rope_low_freq_factor ({self.rope_low_freq_factor}) must be positive and "
                             f"below rope_high_freq_factor ({self.rope_high_freq_factor})")
        if self.rope_original_max_len < 1:
            raise ValueError(f"attention.rope_original_max_len must be positive, got {self.rope_original_max_len}")
        if self.duo_sink < 0 or self.duo_window < 1:
            raise ValueError(f"attention.duo_sink must be >= 0 and duo_window >= 1, got {self.duo_sink} and "
                             f"{self.duo_window}")
        if self.duo_gates and not self.causal:
            raise ValueError("attention.duo_gates needs causal self attention (causal: true)")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


class Attention(nnx.Module):
    """Softmax attention mixer; a Mixer (layers/axes.py) when it is causal self attention.

    Attributes:
      q_proj: [D, H*K] ("embed", "heads").
      k_proj, v_proj: [Dc, Hkv*K] ("embed", "kv_heads"), Dc = context_dim or d_model.
      o_proj: [H*K, D] ("heads", "embed").
    """

    def __init__(self, d_model: int, config: AttentionConfig, *, rngs: nnx.Rngs, context_dim: int | None = None):
        """Builds the projections.

        Args:
          d_model: D, width of x and of the output.
          config: see AttentionConfig.
          rngs: parameter initialisation.
          context_dim: width Dc of the cross-attention context; None means a self-attention layer (Dc = D).
        """
        if config.head_dim is None and d_model % config.n_heads:
            raise ValueError(f"attention.n_heads={config.n_heads} must divide d_model={d_model} "
                             "(or set attention.head_dim)")
        head_dim = config.head_dim if config.head_dim is not None else d_model // config.n_heads
        if head_dim < 1:
            raise ValueError(f"attention: d_model={d_model} gives no head dim for n_heads={config.n_heads}")
        if context_dim is not None and config.causal:
            raise ValueError("attention: a cross-attention layer (context_dim set) needs causal=False")
        if config.rope and context_dim is None and head_dim % 2:
            raise ValueError(f"attention: RoPE needs an even head dim, got head_dim={head_dim}")
        self.config = config
        self.d_model = d_model
        self.head_dim = head_dim
        self.context_dim = context_dim
        n_heads, n_kv = config.n_heads, config.kv_heads
        kv_in = d_model if context_dim is None else context_dim
        self.q_proj = linear(d_model, n_heads * head_dim, ("embed", "heads"), rngs)
        self.k_proj = linear(kv_in, n_kv * head_dim, ("embed", "kv_heads"), rngs)
        self.v_proj = linear(kv_in, n_kv * head_dim, ("embed", "kv_heads"), rngs)
        self.o_proj = linear(n_heads * head_dim, d_model, ("heads", "embed"), rngs)
        if config.duo_gates:
            if context_dim is not None:
                raise ValueError("attention.duo_gates needs self attention, not a cross-attention layer")
            # α per KV head, init 1 (every head full, as the official initial_value); `bounds` makes the trainer
            # clamp it to [0, 1] after every update (train/train.py), as the official loop does before every step.
            self.duo_gate = nnx.Param(jnp.ones((n_kv,), jnp.float32), logical_axes=(None,), bounds=(0.0, 1.0))
        self.kv_policy = None  # a layers.kv_policies.KVPolicy (static: a frozen dataclass), set by set_kv_policy

    def _heads(self, y, n: int):
        return y.reshape(*y.shape[:-1], n, self.head_dim)

    def _attend(self, q, k, v, *, causal: bool, mask=None) -> Float[Array, "B T D"]:
        o_BTHK = dot_product_attention(q, k, v, causal=causal, mask=mask, implementation=self.config.implementation)
        return self.o_proj(o_BTHK.reshape(*o_BTHK.shape[:2], -1))

    @property
    def duo(self) -> bool:
        """The DuoAttention mix is on: gates exist and no KV policy replaces them."""
        return self.config.duo_gates and self.kv_policy is None

    def _duo_attend(self, q: Float[Array, "B T H K"], k: Float[Array, "B S Hkv K"], v: Float[Array, "B S Hkv K"],
                    q_pos, visible_BTS) -> Float[Array, "B T D"]:
        """α·full + (1 − α)·streaming per head (α of its KV head), before o_proj. `visible_BTS`: the keys the full
        attention sees; the streaming attention sees those at positions < duo_sink or > q_pos − duo_window (key
        index = position: the parallel form and the cache both hold position j at index j)."""
        cfg = self.config
        S = k.shape[1]
        j = jnp.arange(S)[None, None, :]
        recent = (j < cfg.duo_sink) | (j > jnp.reshape(q_pos, (1, -1, 1)) - cfg.duo_window)
        full = dot_product_attention(q, k, v, causal=False, mask=visible_BTS, implementation=cfg.implementation)
        stream = dot_product_attention(q, k, v, causal=False, mask=visible_BTS & recent,
                                       implementation=cfg.implementation)
        alpha = jnp.repeat(self.duo_gate[...], cfg.n_heads // cfg.kv_heads).astype(full.dtype)[None, None, :, None]
        o_BTHK = alpha * full + (1 - alpha) * stream
        return self.o_proj(o_BTHK.reshape(*o_BTHK.shape[:2], -1))

    def project_qkv(self, x: Hidden, positions) -> tuple[Float[Array, "B T H K"], Float[Array, "B T Hkv K"],
                                                         Float[Array, "B T Hkv K"]]:
        """Self-attention q, k, v of x, RoPE-rotated at `positions` ([T] or [B, T]) when config.rope."""
        q = self._heads(self.q_proj(x), self.config.n_heads)
        k = self._heads(self.k_proj(x), self.config.kv_heads)
        v = self._heads(self.v_proj(x), self.config.kv_heads)
        if self.config.rope:
            freqs = self.rope_frequencies()
            q = apply_rope(q, positions, freqs=freqs)
            k = apply_rope(k, positions, freqs=freqs)
        return q, k, v

    def rope_frequencies(self) -> Float[Array, " K2"]:
        """The RoPE inverse frequencies [K/2]: theta^(-2i/K), scaled when config.rope_scaling is "llama3"."""
        return scaled_rope_frequencies(self.head_dim, self.config)

    def __call__(self, x: Hidden, context: Float[Array, "B S Dc"] | None = None) -> Hidden:
        """Parallel form.

        Args:
          x: [B, T, D].
          context: None for self attention; [B, S, Dc] memory for cross attention (k, v from it, no RoPE).

        Returns:
          [B, T, D].
        """
        if context is None:
            if self.context_dim is not None:
                raise ValueError("attention: this layer was built for cross attention; pass a context")
            T = x.shape[1]
            q, k, v = self.project_qkv(x, jnp.arange(T))
            if self.config.duo_gates:  # causal (checked at build)
                causal_BTS = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (x.shape[0], T, T))
                return self._duo_attend(q, k, v, jnp.arange(T), causal_BTS)
            return self._attend(q, k, v, causal=self.config.causal)
        if self.config.causal:
            raise ValueError("attention: cross attention needs causal=False")
        q = self._heads(self.q_proj(x), self.config.n_heads)
        k = self._heads(self.k_proj(context), self.config.kv_heads)
        v = self._heads(self.v_proj(context), self.config.kv_heads)
        return self._attend(q, k, v, causal=False)

    # Decoding (Mixer protocol). Only causal self attention decodes token by token.

    @property
    def causal(self) -> bool:
        """Whether token t's output depends only on tokens <= t (causal self attention), the layers that decode."""
        return self.config.causal and self.context_dim is None

    def _check_decoder(self):
        if not self.config.causal or self.context_dim is not None:
            raise ValueError("attention: decoding needs a causal self-attention layer")

    def check_kv_policy(self, policy) -> None:
        """ValueError (naming the policy and this mixer) when this layer cannot decode through `policy`."""
        if not self.config.causal or self.context_dim is not None:
            raise ValueError(f"kv policy {policy.NAME}: {type(self).__name__} decodes only as causal self attention")
        policy.check_heads(self.config.n_heads, self.config.kv_heads, self.head_dim, self.head_dim)

    def set_kv_policy(self, policy) -> None:
        """Reads the KV cache at decode through `policy` (a layers.kv_policies.KVPolicy), or densely when None.

        Set it before init_state: the policy may keep a state of its own in the decode state (under "policy")."""
        if policy is not None:
            self.check_kv_policy(policy)
            rope = tuple(float(f) for f in np.asarray(self.rope_frequencies())) if self.config.rope else ()
            policy = policy.bind_rope(rope)
        self.kv_policy = policy

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> State:
        """Empty KV cache: {"k", "v": [B, max_len, Hkv, K] zeros, "pos": int32 scalar 0}, plus "policy" (the KV
        policy's own state) and "kv_read" (float32: KV tokens per query head the decode steps read) when one is
        set."""
        self._check_decoder()
        shape = (batch_size, max_len, self.config.kv_heads, self.head_dim)
        state = {"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype),
                 "pos": jnp.zeros((), jnp.int32)}
        if self.kv_policy is not None:
            state["policy"] = self.kv_policy.init_state(batch_size, max_len, self.config.kv_heads, self.head_dim,
                                                        n_heads=self.config.n_heads)
            state["kv_read"] = jnp.zeros((), jnp.float32)  # KV tokens per query head read by the decode steps
        return state

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes of KV cache per sequence after seq_len tokens: 2 * seq_len * Hkv * K * itemsize."""
        return 2 * seq_len * self.config.kv_heads * self.head_dim * jnp.dtype(cache_dtype).itemsize

    def _write(self, state: State, x: Hidden) -> tuple[State, Float[Array, "B T H K"], Array]:
        """Projects x (positions pos..pos+T-1), writes its k, v into the cache; returns the query positions too."""
        pos = state["pos"]
        T, max_len = x.shape[1], state["k"].shape[1]
        # Eagerly an overflow is an error; under jit pos is abstract, and the caller's output is poisoned with NaN
        # (see _poison) because dynamic_update_slice would clamp the write onto the last slots.
        if not isinstance(pos, jax.core.Tracer) and int(pos) + T > max_len:
            raise ValueError(f"attention: KV cache of {max_len} slots is full (pos={int(pos)}, {T} new tokens)")
        positions = pos + jnp.arange(T, dtype=jnp.int32)
        q, k, v = self.project_qkv(x, positions)
        cache_k = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, pos, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, pos, 0, 0))
        new = {"k": cache_k, "v": cache_v, "pos": pos + T}
        if "policy" in state:
            new["policy"] = self.kv_policy.observe(state["policy"], q, k, v, pos)
            new["kv_read"] = state["kv_read"]
        return new, q, positions

    def _attend_cache(self, state: State, q: Float[Array, "B T H K"], positions) -> Hidden:
        B, T = q.shape[:2]
        max_len = state["k"].shape[1]
        # Query at absolute position p sees cache slots <= p; slots past pos hold zeros and stay hidden.
        mask_BTS = jnp.broadcast_to((jnp.arange(max_len)[None, :] <= positions[:, None])[None], (B, T, max_len))
        k, v = state["k"].astype(q.dtype), state["v"].astype(q.dtype)
        if self.duo:
            y = self._duo_attend(q, k, v, positions, mask_BTS)
        else:
            y = self._attend(q, k, v, causal=False, mask=mask_BTS)
        return jnp.where(state["pos"] <= max_len, y, jnp.full((), jnp.nan, y.dtype))

    def prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """Runs a prompt x [B, T, D] from position state["pos"]; returns (state after it, y [B, T, D]).

        With pos = 0, y equals __call__(x). Past the cache end: ValueError eagerly, NaN outputs under jit.
        """
        self._check_decoder()
        state, q, positions = self._write(state, x)
        return state, self._attend_cache(state, q, positions)

    def policy_step(self, state: State, x_t: HiddenStep) -> tuple[State, Float[Array, "B H K"], Float[Array, "B H K"]]:
        """A decode step's cache write and its attention through the KV policy: (state, q_t [B, H, K], o_t [B, H, K]
        per head, before o_proj; NaN past the cache end under jit)."""
        state, q, _ = self._write(state, x_t[:, None])
        o, state["policy"], reads = self.kv_policy.attend(state["policy"], q[:, 0], state["k"], state["v"],
                                                          state["pos"])
        state["kv_read"] = state["kv_read"] + reads
        return state, q[:, 0], jnp.where(state["pos"] <= state["k"].shape[1], o, jnp.full((), jnp.nan, o.dtype))

    def decode_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]:
        """One token x_t [B, D] at position state["pos"]; returns (state, y_t [B, D]). With a KV policy the step
        reads only the cache entries the policy selects.

        Past the cache end: ValueError eagerly, NaN outputs under jit.
        """
        if self.kv_policy is not None:
            state, _, o = self.policy_step(state, x_t)
            return state, self.o_proj(o.reshape(o.shape[0], -1))
        state, y = self.prefill(state, x_t[:, None])
        return state, y[:, 0]
