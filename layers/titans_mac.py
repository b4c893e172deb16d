"""Titans MAC, memory as context (arXiv 2501.00663 §4.1): attention over [persistent || memory || segment].

The sequence is cut into segments S of `titans_attention.segment_len` tokens, processed in order:

    h   = M*_{before S}(q(S))               retrieval without update: one memory token per segment token
    y   = Attn([p_1 .. p_Np] || h || S)     causal full attention inside the segment, outputs at S's positions
    M  <- M(ŷ)                              the memory stores the attention output, ŷ = RMSNorm(y)
    o   = y ⊙ σ(M*(ŷ))                      the memory's retrieval with its updated weights gates y

- M is a NeuralMemory layer (layers/titans.py, no persistent tokens of its own) run over the y's as a sequence model:
  per token store-then-retrieve, continuing across segments, so `M*(y)` at token t sees the updates of every full
  memory chunk up to t (the LMM's retrieval rule) and M before the next segment holds all of this segment's y.
- h is retrieved from the memory weights of the segment's start, W_s, with queries q = l2norm(SiLU(x W_q)) per
  memory head, and mapped back to d_model by a linear map (W_h); segment_len must be a multiple of titans.chunk_size,
  so W_s has taken in every earlier segment.
- Persistent tokens are learned [N_p, d_model] vectors, key/value pairs without a position visible to every query
  (layers/titans_attention.py).

Choices where the paper (§4.1) is silent or not causal:
- h_j is the retrieval for segment token j, so causal attention shows it only to queries i >= j (all of h visible to
  every query would leak token j's input to earlier outputs); h_j and x_j share position j for RoPE
  (counted from the segment's start).
- |h| = segment length (N_l = C); the gate ⊗ is y ⊙ sigmoid(·); the retrieval query has no convolution.
- `titans_attention.sliding` (titans-pytorch's `sliding_window_attn`, off by default): query t attends to the h and
  x of positions t - L < j <= t, so the segment's first tokens also see the previous segment's last ones. Without
  it, a needle cut by a segment boundary reaches the tokens after the boundary only through the memory: the S-NIAH
  model trained that way failed every such needle (0.0 exact) while scoring 0.8-1.0 elsewhere; with it,
  configs/niah/titans_mac.yaml scores 0.95-1.0 at every depth at 4x its training length but the needle right before
  the question (header there). The memory is unchanged: it still updates per token and h still reads W_s.
- The memory reads RMSNorm(y), not y (titans-pytorch's `pre_rmsnorm`): without it the memory's inner updates grew
  with the unnormalised attention output and MQAR training diverged to NaN within 75 steps (max_lr 1.0 and 0.1).

Parallel form = prefill from the initial state: a leading piece up to the next segment boundary, whole segments under
`lax.scan` (when segment_len is also a multiple of titans.batch_size, so every segment starts aligned), otherwise a
Python loop, and a trailing piece. From 16 whole segments on, the scan runs over rematerialised groups of about
sqrt(segments) (`segment_group`): the backward keeps the memory's weights at group starts only, not at every segment.
Decoding state: the memory layer's state, W_s, the keys and values of the current segment's h and x (with `sliding`,
the last L tokens' unrotated ones), the position; constant size.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers.axes import Hidden, HiddenStep
from effarch.layers.linear import linear
from effarch.layers.norms import rms_norm
from effarch.layers.rope import apply_rope
from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from effarch.layers.titans_attention import (
    TitansAttentionConfig,
    key_values,
    make_attention,
    persistent_key_values,
    prefixed_attention,
)
from effarch.pallas_kernels.titans import neural_memory_retrieve


def segment_group(n_seg: int) -> int:
    """Segments per rematerialised group of the segment scan (1: no grouping). Groups of G keep n_seg / G + G
    segments' residuals instead of n_seg, for one more forward pass of the segments: G is the largest divisor of n_seg
    up to sqrt(n_seg), used only where it at least halves what is kept (n_seg >= 16; 32 segments keep 12)."""
    g = max(d for d in range(1, math.isqrt(n_seg) + 1) if n_seg % d == 0)
    return g if n_seg // g + g <= n_seg / 2 else 1


class MemoryAsContextState(NamedTuple):
    memory: NeuralMemoryState
    seg_w: dict  # the memory weights at the current segment's start, {"w1": [B, H, K, F], ..., "wL": [B, H, F, K]}
    hk: Float[Array, "B L H K"]  # rotated keys of the current segment's memory tokens (slot = position mod L);
    # with titans_attention.sliding, the unrotated keys of the last L tokens' memory tokens, oldest first
    hv: Float[Array, "B L H K"]
    xk: Float[Array, "B L H K"]  # and of its input tokens
    xv: Float[Array, "B L H K"]
    pos: int | Int[Array, ""]  # tokens seen


class MemoryAsContext(nnx.Module):
    """Titans MAC mixer: [B, T, d_model] -> [B, T, d_model]. Implements the `Mixer` protocol."""

    def __init__(self, d_model: int, memory: NeuralMemoryConfig, attention: TitansAttentionConfig, *,
                 rngs: nnx.Rngs):
        L = attention.segment_len
        if L % memory.chunk_size:
            raise ValueError(f"titans_attention.segment_len={L} must be a multiple of titans.chunk_size="
                             f"{memory.chunk_size} (the memory must have taken in every earlier segment)")
        self.segment_len = L
        self.sliding = attention.sliding
        # The scan over whole segments reuses one trace, so every segment must start at the same mini-batch phase.
        self.aligned = memory.batch_size is None or L % memory.batch_size == 0
        self.d_model, self.n_mem_heads = d_model, memory.n_heads
        self.memory = NeuralMemory(d_model, dataclasses.replace(memory, n_persistent=0), rngs=rngs)
        self.memory_norm = rms_norm(d_model, rngs=rngs)
        self.attn = make_attention(d_model, attention, rngs)
        self.retrieve_q = linear(d_model, d_model, ("embed", "heads"), rngs)
        self.retrieve_out = linear(d_model, d_model, ("heads", "embed"), rngs)
        n_p = memory.n_persistent
        self.persistent = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (n_p, d_model)),
                                     logical_axes=(None, "embed")) if n_p else None)

    def _retrieve(self, seg_w: dict, x: Hidden) -> Hidden:
        """h = W_h M*_{W_s}(l2norm(SiLU(x W_q))) per memory head: [B, n, D]."""
        B, n = x.shape[:2]
        q = jax.nn.silu(self.retrieve_q(x)).reshape(B, n, self.n_mem_heads, -1)
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
        return self.retrieve_out(neural_memory_retrieve(seg_w, q).reshape(B, n, self.d_model))

    def _segment_keys(self, state: MemoryAsContextState, x: Hidden, h: Hidden):
        """Attention inside the segment: caches keyed by slot = position mod L, RoPE at the slots.

        Attention never leaves the segment, so slot positions give the same logits as absolute ones and let every
        whole segment share one trace. Returns (q, new caches, keys [B, 2L, H, K], values, visible [B, n, 2L]).
        """
        B, n = x.shape[:2]
        L, r = self.segment_len, state.pos % self.segment_len
        positions = r + jnp.arange(n)
        q, xk, xv = self.attn.project_qkv(x, positions)
        hk, hv = key_values(self.attn, h, positions)

        def write(cache, new):
            return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, r, 0, 0))

        caches = [write(c, u) for c, u in zip((state.hk, state.hv, state.xk, state.xv), (hk, hv, xk, xv),
                                              strict=True)]
        # Query at slot r + i sees slots <= r + i of both h and x (slots past it are stale or empty).
        seen = jnp.arange(L)[None, :] <= (r + jnp.arange(n))[:, None]  # [n, L]
        visible = jnp.broadcast_to(jnp.concatenate([seen, seen], axis=1), (B, n, 2 * L))
        k_all = jnp.concatenate([caches[0], caches[2]], axis=1)
        v_all = jnp.concatenate([caches[1], caches[3]], axis=1)
        return q, caches, k_all, v_all, visible

    def _sliding_keys(self, state: MemoryAsContextState, x: Hidden, h: Hidden):
        """titans_attention.sliding: query t sees the h and x of positions t - L < j <= t, across segment starts.

        The caches hold the unrotated keys of the L tokens before this piece, oldest first. Positions count from the
        current segment's start, as in `_segment_keys`: queries at their slots r..r+n-1, the caches' keys at r-L..r-1
        (negative for the previous segment). RoPE logits between tokens depend on differences only, so every whole
        segment shares one trace; the unrotated persistent keys see each query at its slot, the same in every path.
        Returns as `_segment_keys`, with keys [B, 2(L + n), H, K].
        """
        B, n = x.shape[:2]
        L, r = self.segment_len, state.pos % self.segment_len
        freqs = self.attn.rope_frequencies()
        q = self.attn.q_proj(x).reshape(B, n, self.attn.config.n_heads, self.attn.head_dim)
        q = apply_rope(q, r + jnp.arange(n), freqs=freqs)
        xk, xv = key_values(self.attn, x)
        hk, hv = key_values(self.attn, h)
        ks, vs = [], []
        for cache_k, cache_v, k, v in ((state.hk, state.hv, hk, hv), (state.xk, state.xv, xk, xv)):
            ks.append(jnp.concatenate([cache_k, k.astype(cache_k.dtype)], 1))
            vs.append(jnp.concatenate([cache_v, v.astype(cache_v.dtype)], 1))
        caches = [ks[0][:, n:], vs[0][:, n:], ks[1][:, n:], vs[1][:, n:]]  # the last L tokens, oldest first
        k_all = apply_rope(jnp.concatenate(ks, 1), r - L + jnp.tile(jnp.arange(L + n), 2), freqs=freqs)
        v_all = jnp.concatenate(vs, 1)
        j, i = jnp.arange(L + n)[None, :], jnp.arange(n)[:, None]  # key j is token pos - L + j, query i is pos + i
        seen = (j <= L + i) & (j > i) & (state.pos - L + j >= 0)  # [n, L + n]; keys before position 0 do not exist
        visible = jnp.broadcast_to(jnp.concatenate([seen, seen], axis=1), (B, n, 2 * (L + n)))
        return q, caches, k_all, v_all, visible

    def _piece(self, state: MemoryAsContextState, x: Hidden, decode: bool):
        """Tokens x [B, n, D] inside one segment (pos mod L + n <= L): (state after them, o [B, n, D])."""
        B, n = x.shape[:2]
        r = state.pos % self.segment_len
        w_now = state.memory.memory.w
        if isinstance(r, int):
            seg_w = w_now if r == 0 else state.seg_w
        else:  # decoding: the position is traced
            seg_w = jax.tree.map(lambda a, b: jnp.where(r == 0, a, b), w_now, state.seg_w)
        h = self._retrieve(seg_w, x)
        if self.sliding:
            q, caches, k_all, v_all, visible = self._sliding_keys(state, x, h)
        else:
            q, caches, k_all, v_all, visible = self._segment_keys(state, x, h)
        persistent = None if self.persistent is None else self.persistent[...]
        pk, pv = persistent_key_values(self.attn, persistent, B)
        o = prefixed_attention(self.attn, q, k_all, v_all, visible, pk, pv)
        y = self.attn.o_proj(o.reshape(B, n, -1))
        y_mem = self.memory_norm(y)
        if decode:
            memory, m = self.memory.decode_step(state.memory, y_mem[:, 0])
            m = m[:, None]
        else:
            memory, m = self.memory.prefill(state.memory, y_mem)
        new = MemoryAsContextState(memory, seg_w, *caches, state.pos + n)
        return new, y * jax.nn.sigmoid(m)

    def _segments(self, state: MemoryAsContextState, xs: Float[Array, "B S L D"]):
        """Whole segments from a segment boundary: lax.scan over one trace when they all start aligned."""
        n_seg, L = xs.shape[1], self.segment_len
        if self.sliding and state.pos < L and n_seg > 1:
            # The window mask reads the start position (a Python int the scan body sees at every segment): only a
            # segment starting at >= L has all of its window's earlier tokens, so the first one runs on its own.
            state, o = self._piece(state, xs[:, 0], decode=False)
            state, rest = self._segments(state, xs[:, 1:])
            return state, jnp.concatenate([o, rest], 1)
        if not self.aligned or n_seg == 1:
            outs = []
            for i in range(n_seg):
                state, o = self._piece(state, xs[:, i], decode=False)
                outs.append(o)
            return state, jnp.concatenate(outs, 1)
        pos0, mem_pos0 = state.pos, state.memory.memory.pos  # Python ints; the body sees them at every segment

        def strip(s):
            return s._replace(pos=None, memory=s.memory._replace(memory=s.memory.memory._replace(pos=None)))

        def body(carry, x):
            s = carry._replace(pos=pos0, memory=carry.memory._replace(
                memory=carry.memory.memory._replace(pos=mem_pos0)))
            s, o = self._piece(s, x, decode=False)
            return strip(s), o

        # A scan keeps every step's residuals for its backward, and MAC's hold copies of the memory's weights (W, S,
        # Wref and their uses) per segment: most of the step's memory at scale (pallas_kernels/titans/README.md).
        # Segments run in groups of G under a rematerialised scan: the backward keeps one carry per group and
        # recomputes one group's G segments at a time.
        xs_t = jnp.moveaxis(xs, 1, 0)  # [S, B, L, D]
        G = segment_group(n_seg)
        if G > 1:
            def group(carry, xg):
                return jax.lax.scan(body, carry, xg)

            carry, o = jax.lax.scan(jax.checkpoint(group), strip(state), xs_t.reshape(n_seg // G, G, *xs_t.shape[1:]))
            o = o.reshape(n_seg, *o.shape[2:])
        else:
            carry, o = jax.lax.scan(body, strip(state), xs_t)
        state = carry._replace(pos=pos0 + n_seg * L, memory=carry.memory._replace(
            memory=carry.memory.memory._replace(pos=mem_pos0 + n_seg * L)))
        return state, jnp.moveaxis(o, 0, 1).reshape(xs.shape[0], n_seg * L, -1)

    def __call__(self, x: Hidden) -> Hidden:
        _, o = self.prefill(self.init_state(x.shape[0], x.shape[1]), x)
        return o

    def init_state(self, batch_size: int, max_len: int) -> MemoryAsContextState:
        """Fresh memory and empty segment caches; `max_len` is unused (constant size)."""
        memory = self.memory.init_state(batch_size, max_len)
        H, K = self.attn.config.kv_heads, self.attn.head_dim
        empty = jnp.zeros((batch_size, self.segment_len, H, K), jnp.float32)
        return MemoryAsContextState(memory, memory.memory.w, empty, empty, empty, empty, 0)

    def prefill(self, state: MemoryAsContextState, x: Hidden) -> tuple[MemoryAsContextState, Hidden]:
        if not isinstance(state.pos, int):
            raise ValueError("MemoryAsContext.prefill needs a state whose position is a Python int (from init_state "
                             "or a previous prefill); continue a decode with decode_step")
        L, T = self.segment_len, x.shape[1]
        head = min((L - state.pos % L) % L, T)
        n_seg = (T - head) // L
        outs = []
        if head:
            state, o = self._piece(state, x[:, :head], decode=False)
            outs.append(o)
        if n_seg:
            body = x[:, head:head + n_seg * L]
            state, o = self._segments(state, body.reshape(x.shape[0], n_seg, L, -1))
            outs.append(o)
        if head + n_seg * L < T:
            state, o = self._piece(state, x[:, head + n_seg * L:], decode=False)
            outs.append(o)
        return state, jnp.concatenate(outs, 1) if len(outs) > 1 else outs[0]

    def decode_step(self, state: MemoryAsContextState, x_t: HiddenStep) -> tuple[MemoryAsContextState, HiddenStep]:
        state, o = self._piece(state, x_t[:, None], decode=True)
        return state, o[:, 0]

    def state_size(self, seq_len: int) -> int:
        """Bytes per sequence: the memory layer's state, W_s, and the segment's float32 keys and values of h and x."""
        del seq_len
        seg_w = self.memory.memory_size() * 4
        caches = 4 * self.segment_len * self.attn.config.kv_heads * self.attn.head_dim * 4
        return self.memory.state_size(0) + seg_w + caches
