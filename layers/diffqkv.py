"""Sigma's DiffQKV attention: differential query, key and value heads (Lin et al., arXiv 2501.13629v2, §2).

Paper: arXiv 2501.13629 §2 (DiffQKV), Appendix E (augmented Q), Appendix B.2 (selective V cache fetching).
Reference: none public; the head mapping is FlexHeadFA's (xiayuqing0622/flex_head_fa).

Query head i reads K head floor(i * n_k / n_q) and V head floor(i * n_v / n_q); with n_k < n_v the KV cache shrinks
where quality is least sensitive (paper Table 1). The attention is `pallas_kernels.diffqkv.diffqkv_attention`.

Choices:
- augmented Q: q = q_down(SiLU(q_gate(q0)) * q_up(q0)) on the projected query q0, no residual (App. E), intermediate
  size `aug_q_hidden` (default 1.5 * d_model, the paper's best setting);
- K head-dim compression: keys are projected to `k_cache_dim` < head_dim, cached small, and brought back to head_dim
  by one trainable up-projection shared by the K heads, applied after the cache and before RoPE; without compression
  the cache holds RoPE-rotated keys, as `Attention` does;
- selective V (`select_v_top_n`) applies to the cached path only (prefill and decode), as in the paper, where it is
  an inference-time saving; the parallel form always attends fully;
- projections have no bias (Llama); o_proj reads the n_q * v_head_dim concatenated head outputs.
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
from effarch.layers.mlp import SwiGLU
from effarch.layers.rope import apply_rope, scaled_rope_frequencies
from effarch.pallas_kernels.diffqkv import diffqkv_attention, selective_v_attention


@dataclasses.dataclass(frozen=True, slots=True)
class DiffQKVConfig:
    n_q_heads: int = 8  # n_q query heads
    n_k_heads: int = 2  # n_k key heads; must divide n_q_heads
    n_v_heads: int = 4  # n_v value heads; must divide n_q_heads (Sigma: 32 / 4 / 16)
    head_dim: int | None = None  # K: query and attended key head dim; None = d_model // n_q_heads
    v_head_dim: int | None = None  # V: value head dim; None = head_dim
    k_cache_dim: int | None = None  # cached key head dim; None = head_dim, smaller adds the K up-projection
    aug_q: bool = True  # SwiGLU MLP on the projected query (App. E)
    aug_q_hidden: int | None = None  # AugQ intermediate size; None = 1.5 * d_model (paper Table 3)
    rope: bool = True  # rotary embeddings on q and k
    rope_theta: float = 10000.0  # RoPE base
    # RoPE scaling, as AttentionConfig (so a converted Llama 3 checkpoint keeps its positions)
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    select_v_top_n: int | None = None  # cached path only: read the top-N V rows per query (paper Sel.V-top100)
    select_v_renormalize: bool = False  # rescale the selected weights to sum to 1 (the paper does not)
    implementation: str | None = None  # diffqkv_attention backend; None = platform default

    def __post_init__(self):
        for field in ("n_q_heads", "n_k_heads", "n_v_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"diffqkv.{field} must be positive, got {getattr(self, field)}")
        for field in ("n_k_heads", "n_v_heads"):
            if self.n_q_heads % getattr(self, field):
                raise ValueError(f"diffqkv.{field}={getattr(self, field)} must divide n_q_heads={self.n_q_heads}")
        for field in ("head_dim", "v_head_dim", "k_cache_dim", "aug_q_hidden", "select_v_top_n"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise ValueError(f"diffqkv.{field} must be positive, got {getattr(self, field)}")
        if self.head_dim is not None and self.k_cache_dim is not None and self.k_cache_dim > self.head_dim:
            raise ValueError(f"diffqkv.k_cache_dim={self.k_cache_dim} must not exceed head_dim={self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"diffqkv.rope_theta must be positive, got {self.rope_theta}")


class DiffQKVAttention(nnx.Module):
    """Causal DiffQKV self-attention mixer (a Mixer, layers/axes.py).

    Attributes:
      q_proj: [D, Hq*K] ("embed", "heads").
      aug_q: SwiGLU [Hq*K -> F -> Hq*K], or None.
      k_proj: [D, Hk*Kc] ("embed", "kv_heads"), Kc = k_cache_dim.
      k_up: [Kc, K], or None when Kc = K.
      v_proj: [D, Hv*V] ("embed", "kv_heads").
      o_proj: [Hq*V, D] ("heads", "embed").
    """

    def __init__(self, d_model: int, config: DiffQKVConfig, *, rngs: nnx.Rngs):
        head_dim = config.head_dim if config.head_dim is not None else d_model // config.n_q_heads
        if head_dim < 1:
            raise ValueError(f"diffqkv: d_model={d_model} gives no head dim for n_q_heads={config.n_q_heads}")
        if config.rope and head_dim % 2:
            raise ValueError(f"diffqkv: RoPE needs an even head_dim, got {head_dim}")
        k_cache_dim = config.k_cache_dim if config.k_cache_dim is not None else head_dim
        if k_cache_dim > head_dim:
            raise ValueError(f"diffqkv.k_cache_dim={k_cache_dim} must not exceed head_dim={head_dim}")
        self.config = config
        self.d_model = d_model
        self.head_dim = head_dim
        self.v_head_dim = config.v_head_dim if config.v_head_dim is not None else head_dim
        self.k_cache_dim = k_cache_dim
        n_q, n_k, n_v = config.n_q_heads, config.n_k_heads, config.n_v_heads
        self.q_proj = linear(d_model, n_q * head_dim, ("embed", "heads"), rngs)
        self.aug_q = SwiGLU(n_q * head_dim, self.aug_q_hidden(d_model), rngs=rngs) if config.aug_q else None
        self.k_proj = linear(d_model, n_k * k_cache_dim, ("embed", "kv_heads"), rngs)
        self.k_up = (
            linear(k_cache_dim, head_dim, (None, None), rngs)
            if k_cache_dim < head_dim
            else None
        )
        self.v_proj = linear(d_model, n_v * self.v_head_dim, ("embed", "kv_heads"), rngs)
        self.o_proj = linear(n_q * self.v_head_dim, d_model, ("heads", "embed"), rngs)
        self.kv_policy = None  # a layers.kv_policies.KVPolicy (static), set by set_kv_policy

    def aug_q_hidden(self, d_model: int) -> int:
        return self.config.aug_q_hidden if self.config.aug_q_hidden is not None else (3 * d_model) // 2

    def _freqs(self) -> Float[Array, " K2"]:
        return scaled_rope_frequencies(self.head_dim, self.config)

    def _queries(self, x: Hidden, positions) -> Float[Array, "B T H K"]:
        q0 = self.q_proj(x)
        if self.aug_q is not None:
            q0 = self.aug_q(q0)
        q = q0.reshape(*x.shape[:2], self.config.n_q_heads, self.head_dim)
        return apply_rope(q, positions, freqs=self._freqs()) if self.config.rope else q

    def _small_keys(self, x: Hidden) -> Float[Array, "B T Hk Kc"]:
        return self.k_proj(x).reshape(*x.shape[:2], self.config.n_k_heads, self.k_cache_dim)

    def _values(self, x: Hidden) -> Float[Array, "B T Hv V"]:
        return self.v_proj(x).reshape(*x.shape[:2], self.config.n_v_heads, self.v_head_dim)

    def _expand_keys(self, k: Float[Array, "B S Hk Kc"], positions) -> Float[Array, "B S Hk K"]:
        """Up-projects cached keys (if compressed) and rotates them at `positions`."""
        if self.k_up is not None:
            k = self.k_up(k)
        return apply_rope(k, positions, freqs=self._freqs()) if self.config.rope else k

    def _out(self, o: Float[Array, "B T H V"]) -> Hidden:
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def __call__(self, x: Hidden) -> Hidden:
        """Parallel causal form: x [B, T, D] -> [B, T, D]."""
        positions = jnp.arange(x.shape[1])
        q = self._queries(x, positions)
        k = self._expand_keys(self._small_keys(x), positions)
        o = diffqkv_attention(q, k, self._values(x), causal=True, implementation=self.config.implementation)
        return self._out(o)

    # Decoding (Mixer protocol): a cache of max_len slots, one position counter shared by the batch.

    def check_kv_policy(self, policy) -> None:
        """ValueError naming the policy and what stops it: a KV policy reads one cache entry per (token, KV head), so
        it needs n_k_heads == n_v_heads, uncompressed keys and no selective V."""
        c = self.config
        if c.n_k_heads != c.n_v_heads or self.k_up is not None or c.select_v_top_n is not None:
            raise ValueError(f"kv policy {policy.NAME}: mixer diffqkv needs n_k_heads == n_v_heads, no k_cache_dim "
                             f"compression and no select_v_top_n (this one has {c.n_k_heads} K / {c.n_v_heads} V "
                             f"heads, k_cache_dim {self.k_cache_dim} of {self.head_dim}, select_v_top_n "
                             f"{c.select_v_top_n})")
        policy.check_heads(c.n_q_heads, c.n_k_heads, self.head_dim, self.v_head_dim)

    def set_kv_policy(self, policy) -> None:
        """Reads the cache at decode through `policy` (None: densely); set it before init_state."""
        if policy is not None:
            self.check_kv_policy(policy)
            rope = tuple(float(f) for f in np.asarray(self._freqs())) if self.config.rope else ()
            policy = policy.bind_rope(rope)
        self.kv_policy = policy

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> State:
        """Empty cache: {"k": [B, max_len, Hk, Kc], "v": [B, max_len, Hv, V] zeros, "pos": int32 scalar 0}, plus
        "policy" (the KV policy's state) when one is set."""
        state = {
            "k": jnp.zeros((batch_size, max_len, self.config.n_k_heads, self.k_cache_dim), cache_dtype),
            "v": jnp.zeros((batch_size, max_len, self.config.n_v_heads, self.v_head_dim), cache_dtype),
            "pos": jnp.zeros((), jnp.int32),
        }
        if self.kv_policy is not None:
            state["policy"] = self.kv_policy.init_state(batch_size, max_len, self.config.n_k_heads, self.head_dim,
                                                        n_heads=self.config.n_q_heads)
            state["kv_read"] = jnp.zeros((), jnp.float32)  # KV tokens per query head read by the decode steps
        return state

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes of cache per sequence after seq_len tokens: seq_len * (Hk * Kc + Hv * V) * itemsize."""
        per_token = self.config.n_k_heads * self.k_cache_dim + self.config.n_v_heads * self.v_head_dim
        return seq_len * per_token * jnp.dtype(cache_dtype).itemsize

    def prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """Runs x [B, T, D] from position state["pos"]; returns (state after it, y [B, T, D]).

        With pos = 0 and no selective V, y equals __call__(x). Past the cache end: ValueError eagerly, NaN outputs
        under jit (dynamic_update_slice would otherwise clamp the write onto the last slots).
        """
        return self._run(state, x, through_policy=False)

    def _run(self, state: State, x: Hidden, *, through_policy: bool) -> tuple[State, Hidden]:
        """prefill, or (through_policy, one token) a decode step whose query reads the KV policy's selection."""
        pos = state["pos"]
        T, max_len = x.shape[1], state["k"].shape[1]
        if not isinstance(pos, jax.core.Tracer) and int(pos) + T > max_len:
            raise ValueError(f"diffqkv: cache of {max_len} slots is full (pos={int(pos)}, {T} new tokens)")
        positions = pos + jnp.arange(T, dtype=jnp.int32)
        q = self._queries(x, positions)
        k_new = self._small_keys(x)
        # Uncompressed keys are cached rotated, so a step does not re-rotate the cache; compressed keys are cached
        # small and expanded (up-projection, then RoPE) at read time.
        if self.k_up is None and self.config.rope:
            k_new = apply_rope(k_new, positions, freqs=self._freqs())
        cache_k = jax.lax.dynamic_update_slice(state["k"], k_new.astype(state["k"].dtype), (0, pos, 0, 0))
        v_new = self._values(x)
        cache_v = jax.lax.dynamic_update_slice(state["v"], v_new.astype(state["v"].dtype), (0, pos, 0, 0))
        new = {"k": cache_k, "v": cache_v, "pos": pos + T}
        if "policy" in state:
            new["policy"] = self.kv_policy.observe(state["policy"], q, k_new, v_new, pos)
            new["kv_read"] = state["kv_read"]
        state = new
        if through_policy:
            o, state["policy"], reads = self.kv_policy.attend(state["policy"], q[:, 0], cache_k, cache_v,
                                                              state["pos"])
            state["kv_read"] = state["kv_read"] + reads
            y = self._out(o[:, None])
            return state, jnp.where(pos + T <= max_len, y, jnp.full((), jnp.nan, y.dtype))

        k = cache_k.astype(q.dtype)
        if self.k_up is not None:
            k = self._expand_keys(k, jnp.arange(max_len))
        v = cache_v.astype(q.dtype)
        # Slots past the newest token hold zeros; the causal mask at q_offset = pos hides them.
        if self.config.select_v_top_n is None:
            o = diffqkv_attention(q, k, v, causal=True, q_offset=pos, implementation=self.config.implementation)
        else:
            o = selective_v_attention(q, k, v, top_n=self.config.select_v_top_n,
                                      renormalize=self.config.select_v_renormalize, q_offset=pos)
        y = self._out(o)
        return state, jnp.where(pos + T <= max_len, y, jnp.full((), jnp.nan, y.dtype))

    def decode_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]:
        """One token x_t [B, D] at position state["pos"]; returns (state, y_t [B, D]). With a KV policy the step
        reads only the cache entries the policy selects."""
        state, y = self._run(state, x_t[:, None], through_policy=self.kv_policy is not None)
        return state, y[:, 0]
