"""Landmark attention token mixer, with block-memory retrieval for inputs far longer than the training window.

Paper: Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers",
arXiv 2305.16300. Reference: epfml/landmark-attention@78ec517, models/landmark.py (training attention) and
models/caches/mem_cache.py (`MemLMCacheStorage`: the block cache, top-k retrieval, positional remapping).

Choices:
- The landmark layout is a function of position: position p is a landmark iff p % (L + 1) == L, L = block_len
  regular tokens per block. The Mixer protocol passes hidden states, not token ids, so the data pipeline
  (`effarch.train.data.text.insert_landmarks`) puts the landmark token exactly there; windows are therefore aligned
  to blocks (the paper cuts them at random offsets; the op itself takes any layout, see pallas_kernels/landmark).
- Softmax attention heads with RoPE on q and k before the grouped softmax; no bias (like layers/attention.py).
- `__call__` / `prefill` / `decode_step` are exact: a KV cache of max_len slots and the full grouped softmax.
- `memory_prefill` is the paper's inference: tokens arrive in chunks; completed blocks move to a block cache (a
  ring buffer of `max_blocks`: the oldest block is evicted first, as mem_cache.py's); per
  token and head the cached landmark keys are scored and the top-k blocks are attended with the grouped softmax
  next to the local context (the incomplete block and the chunk). Retrieval uses "per_token_and_head" selection.
- Positional remapping as in mem_cache.py: for scoring, the k most recent cached blocks sit in slots 1..k and all
  older ones in slot 0 (landmark at slot * (L + 1) + L); the retrieved blocks, in temporal order, take the
  positions i * (L + 1) (+ L + 1 if the block's slot is not 0), and the local context starts at
  min(n_blocks, k + 1) * (L + 1). With `remap=False` every block keeps its true position, and retrieval of all
  blocks equals the full grouped softmax (tests/layers/test_landmark.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers.axes import Hidden, HiddenStep, State
from effarch.layers.linear import linear
from effarch.layers.rope import apply_rope, rope_frequencies
from effarch.pallas_kernels.landmark import landmark_attention, landmark_attention_cached
from effarch.pallas_kernels.landmark.reference import grouped_softmax


@dataclasses.dataclass(frozen=True, slots=True)
class LandmarkConfig:
    n_heads: int = 4  # H
    head_dim: int | None = None  # K = V; None = d_model // n_heads
    block_len: int = 50  # L: regular tokens per block; a landmark follows each (paper `mem_freq` 50)
    rope_theta: float = 10000.0
    tile: int = 64  # query/key tile of the blockwise "xla" op
    mem_topk: int = 2  # k: blocks retrieved per token and head at inference (paper: 2 and 4)
    remap: bool = True  # the paper's positional remapping of retrieved blocks
    implementation: str | None = None  # landmark_attention backend; None = platform default

    def __post_init__(self):
        for name in ("n_heads", "block_len", "tile", "mem_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"landmark.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"landmark.head_dim must be even (RoPE), got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"landmark.rope_theta must be positive, got {self.rope_theta}")


def is_landmark_position(positions: Int[Array, "*N"], block_len: int) -> Array:
    """True where a landmark sits: after every block_len regular tokens (position % (L + 1) == L)."""
    return positions % (block_len + 1) == block_len


def _rotate(x: Float[Array, "*N K"], positions: Int[Array, "*N"], theta: float) -> Float[Array, "*N K"]:
    """apply_rope's rotate-half rotation for any leading shape (per-key positions of retrieved blocks)."""
    freqs = rope_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs.reshape((1,) * positions.ndim + (-1,))
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class LandmarkAttention(nnx.Module):
    """Grouped-softmax attention over landmark-delimited blocks; a Mixer (layers/axes.py).

    Attributes:
      q_proj, k_proj, v_proj: [D, H*K] ("embed", "heads").
      o_proj: [H*K, D] ("heads", "embed").
    """

    def __init__(self, d_model: int, config: LandmarkConfig, *, rngs: nnx.Rngs):
        head_dim = config.head_dim if config.head_dim is not None else d_model // config.n_heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"landmark: d_model={d_model} / n_heads={config.n_heads} gives head_dim {head_dim}; "
                             "RoPE needs an even head_dim")
        self.config = config
        self.d_model = d_model
        self.head_dim = head_dim
        hk = config.n_heads * head_dim
        self.q_proj = linear(d_model, hk, ("embed", "heads"), rngs)
        self.k_proj = linear(d_model, hk, ("embed", "heads"), rngs)
        self.v_proj = linear(d_model, hk, ("embed", "heads"), rngs)
        self.o_proj = linear(hk, d_model, ("heads", "embed"), rngs)

    @property
    def block_size(self) -> int:
        """N = L + 1 positions per block, the landmark included."""
        return self.config.block_len + 1

    def _qkv(self, x: Hidden) -> tuple[Float[Array, "B T H K"], Float[Array, "B T H K"], Float[Array, "B T H K"]]:
        """Unrotated q, k, v."""
        shape = (*x.shape[:2], self.config.n_heads, self.head_dim)
        return self.q_proj(x).reshape(shape), self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)

    def _out(self, o: Float[Array, "B T H K"]) -> Hidden:
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def __call__(self, x: Hidden) -> Hidden:
        """Parallel form: x [B, T, D] at positions 0..T-1 -> [B, T, D]."""
        B, T = x.shape[:2]
        positions = jnp.arange(T)
        q, k, v = self._qkv(x)
        q = apply_rope(q, positions, self.config.rope_theta)
        k = apply_rope(k, positions, self.config.rope_theta)
        is_lm = jnp.broadcast_to(is_landmark_position(positions, self.config.block_len), (B, T))
        o = landmark_attention(q, k, v, is_lm, block_size=self.config.tile, implementation=self.config.implementation)
        return self._out(o)

    # --- exact decoding (Mixer protocol): a KV cache and the full grouped softmax -----------------------------

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> State:
        """Empty KV cache: {"k", "v": [B, S, H, K] zeros, "pos": int32 scalar 0}, S = max_len rounded up to whole
        blocks (decode_step reads the cache as blocks)."""
        slots = -(-max_len // self.block_size) * self.block_size
        shape = (batch_size, slots, self.config.n_heads, self.head_dim)
        return {"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype), "pos": jnp.zeros((), jnp.int32)}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes of KV cache per sequence after seq_len tokens (exact decoding keeps every key)."""
        return 2 * seq_len * self.config.n_heads * self.head_dim * jnp.dtype(cache_dtype).itemsize

    def prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """Runs x [B, T, D] from position state["pos"]; with pos = 0 the output equals __call__(x).

        Past the cache end: ValueError eagerly, NaN outputs under jit.
        """
        pos = state["pos"]
        B, T = x.shape[:2]
        max_len = state["k"].shape[1]
        if not isinstance(pos, jax.core.Tracer) and int(pos) + T > max_len:
            raise ValueError(f"landmark: KV cache of {max_len} slots is full (pos={int(pos)}, {T} new tokens)")
        positions = pos + jnp.arange(T, dtype=jnp.int32)
        q, k, v = self._qkv(x)
        q = apply_rope(q, positions, self.config.rope_theta)
        k = apply_rope(k, positions, self.config.rope_theta)
        cache_k = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, pos, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, pos, 0, 0))
        is_lm = jnp.broadcast_to(is_landmark_position(jnp.arange(max_len), self.config.block_len), (B, max_len))
        o = landmark_attention_cached(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), is_lm, positions)
        y = self._out(o)
        y = jnp.where(pos + T <= max_len, y, jnp.full((), jnp.nan, y.dtype))
        return {"k": cache_k, "v": cache_v, "pos": pos + T}, y

    def decode_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]:
        """One token x_t [B, D] at position p = state["pos"]; returns (state, y_t [B, D]).

        O(S) per token: the cache is read as blocks of N; the completed blocks (before p's block) are groups of
        the top-level softmax, and the regular tokens <= p of p's own block are its current-block keys (its own
        landmark, even when p is that landmark, is left out).
        """
        cfg, N = self.config, self.block_size
        pos = state["pos"]
        B, S = state["k"].shape[:2]
        if not isinstance(pos, jax.core.Tracer) and int(pos) + 1 > S:
            raise ValueError(f"landmark: KV cache of {S} slots is full (pos={int(pos)})")
        q, k, v = self._qkv(x_t[:, None])
        positions = pos[None]
        q = apply_rope(q, positions, cfg.rope_theta).astype(jnp.float32)
        k = apply_rope(k, positions, cfg.rope_theta)
        cache_k = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, pos, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, pos, 0, 0))
        blocks_k = cache_k.reshape(B, S // N, N, *cache_k.shape[2:]).astype(jnp.float32)
        blocks_v = cache_v.reshape(B, S // N, N, *cache_v.shape[2:]).astype(jnp.float32)
        own, offset = pos // N, pos % N
        scale = self.head_dim**-0.5
        s_mem = jnp.einsum("bthk,bmnhk->bhtmn", q, blocks_k) * scale
        mem_valid = jnp.broadcast_to((jnp.arange(S // N) < own)[None, None, None], s_mem.shape[:4])
        loc_k = jax.lax.dynamic_index_in_dim(blocks_k, own, axis=1, keepdims=False)
        loc_v = jax.lax.dynamic_index_in_dim(blocks_v, own, axis=1, keepdims=False)
        s_loc = jnp.einsum("bthk,bshk->bhts", q, loc_k) * scale
        idx = jnp.arange(N)
        key_valid = jnp.broadcast_to(((idx <= offset) & (idx != N - 1))[None], (B, N))
        no_landmark = jnp.zeros((B, N), bool)
        w_loc, w_mem = grouped_softmax(s_loc, no_landmark, jnp.array([N - 1]), s_mem, mem_valid, key_valid)
        o = jnp.einsum("bhts,bshv->bthv", w_loc, loc_v) + jnp.einsum("bhtmn,bmnhv->bthv", w_mem, blocks_v)
        y = self._out(o.astype(x_t.dtype))[:, 0]
        y = jnp.where(pos + 1 <= S, y, jnp.full((), jnp.nan, y.dtype))
        return {"k": cache_k, "v": cache_v, "pos": pos + 1}, y

    # --- inference with a block memory (paper §3.3, mem_cache.py) -------------------------------------------

    def init_memory(self, batch_size: int, max_blocks: int, max_chunk: int = 1, cache_dtype=jnp.float32) -> State:
        """Empty block memory keeping the last `max_blocks` completed blocks, fed chunks of at most `max_chunk` tokens.

        A ring buffer, as the paper's cache (mem_cache.py's `cache_iter`): once `max_blocks` blocks are cached, each
        new block evicts the oldest, so memory is bounded whatever the context length. Block b (the b-th completed)
        lives in slot b % M.

        {"mem_k", "mem_v": [B, M, N, H, K] unrotated keys / values of completed blocks (N = L + 1, landmark last),
         "mem_lm_k": [B, H, M, K] their landmark keys again, rotated to the base position of
           _landmark_base_positions and laid out per head, so the per-token scoring reads them contiguously,
         "n_blocks": int32 blocks completed so far (evicted ones included), "loc_k", "loc_v": [B, N, H, K] the
         incomplete block, "pos": int32 tokens seen, "max_blocks": int32 the blocks kept}.
        M = max_blocks + the blocks one chunk can complete: a chunk's blocks are written before they are counted, into
        slots whose blocks are already evicted, so a chunk's queries still see all `max_blocks` kept blocks.
        """
        N, H, K = self.block_size, self.config.n_heads, self.head_dim
        slack = (N - 1 + max_chunk) // N + 1
        mem = (batch_size, max_blocks + slack, N, H, K)
        loc = (batch_size, N, H, K)
        zeros = lambda shape: jnp.zeros(shape, cache_dtype)  # noqa: E731
        return {"mem_k": zeros(mem), "mem_v": zeros(mem), "mem_lm_k": zeros((batch_size, H, mem[1], K)),
                "n_blocks": jnp.zeros((), jnp.int32),
                "loc_k": zeros(loc), "loc_v": zeros(loc), "pos": jnp.zeros((), jnp.int32),
                "max_blocks": jnp.full((), max_blocks, jnp.int32)}

    def _landmark_base_positions(self, block_idx: Int[Array, " M"]) -> Int[Array, " M"]:
        """Position of each cached block's landmark key as stored in mem_lm_k: slot 0 under remapping (where every
        block but the k most recent sits), the true position without it."""
        N = self.block_size
        return jnp.full_like(block_idx, N - 1) if self.config.remap else block_idx * N + N - 1

    def _retrieve(self, state: State, q: Float[Array, "B T H K"]):
        """Top-k cached blocks per (token, head): scores [B, H, T, k, N], values, validity and the picked blocks
        [B, H, T, k] (block b: the b-th completed, in slot b % M), in temporal order."""
        cfg, N = self.config, self.block_size
        topk = cfg.mem_topk
        mem_k, mem_v, n = state["mem_k"].astype(q.dtype), state["mem_v"].astype(q.dtype), state["n_blocks"]
        M = mem_k.shape[1]
        idx_M = jnp.arange(M)
        # The block in each slot: the latest b < n with b % M == slot (negative: never written); kept if it is one of
        # the last max_blocks.
        t_M = n - 1 - jnp.mod(n - 1 - idx_M, M)
        valid_M = (t_M >= 0) & (t_M >= n - state["max_blocks"])
        k_eff = min(topk, M)
        scale = self.head_dim**-0.5
        # Landmark keys are stored already rotated to their base position (see _landmark_base_positions), so the
        # O(n_blocks) scoring is one product: no rotation of every cached key per token.
        s_lm = jnp.einsum("bthk,bhmk->bhtm", q, state["mem_lm_k"].astype(q.dtype)) * scale
        if cfg.remap:
            # The k most recent blocks sit in slots 1..k: rescore just them at their slot positions.
            recent = jnp.maximum(n - k_eff, 0) + jnp.arange(k_eff)  # blocks; may run past n, masked below
            slot = recent - (n - topk) + 1
            lm_raw = mem_k[:, recent % M, N - 1]  # [B, k, H, K]
            lm_rot = _rotate(lm_raw, jnp.broadcast_to((slot * N + N - 1)[None, :, None], lm_raw.shape[:3]),
                             cfg.rope_theta)
            s_recent = jnp.einsum("bthk,bmhk->bhtm", q, lm_rot) * scale
            s_lm = s_lm.at[..., recent % M].set(s_recent)
            slot_M = jnp.where(t_M >= n - topk, t_M - (n - topk) + 1, 0)
        s_lm = jnp.where(valid_M[None, None, None], s_lm, -jnp.inf)
        _, picked = jax.lax.top_k(s_lm, k_eff)
        # Temporal order (by block, not slot); invalid picks (fewer blocks than k) sort last.
        sel = jnp.sort(jnp.where(valid_M[picked], t_M[picked], jnp.iinfo(jnp.int32).max), axis=-1)
        sel_valid = sel < n
        sel = jnp.where(sel_valid, sel, 0)
        slots = sel % M
        B, H, T = sel.shape[:3]
        b_idx = jnp.arange(B)[:, None, None, None]
        h_idx = jnp.arange(H)[None, :, None, None]
        k_sel = mem_k[b_idx, slots, :, h_idx]  # [B, H, T, k, N, K]
        v_sel = mem_v[b_idx, slots, :, h_idx]
        if cfg.remap:
            base = (slot_M[slots] > 0) * N + jnp.arange(k_eff)[None, None, None] * N
        else:
            base = sel * N
        k_pos = base[..., None] + jnp.arange(N)[None, None, None, None]
        k_sel = _rotate(k_sel, k_pos, cfg.rope_theta)
        s_sel = jnp.einsum("bthk,bhtmnk->bhtmn", q, k_sel) * scale
        return s_sel, v_sel, sel_valid, sel

    def memory_prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """Processes a chunk x [B, T, D] (T <= the init_memory max_chunk) with retrieval; returns (state, y).

        Attention per token: the top-k cached blocks ++ the incomplete block ++ the chunk (causal), all in one
        grouped softmax. Blocks completed by the end of the chunk then move to the cache, evicting the oldest beyond
        max_blocks. A chunk longer than init_memory's max_chunk: ValueError eagerly, NaN outputs under jit.
        """
        cfg, N = self.config, self.block_size
        B, T = x.shape[:2]
        pos, n, loc_len = state["pos"], state["n_blocks"], state["pos"] % N
        M, capacity = state["mem_k"].shape[1], state["max_blocks"]
        n_slots = (N - 1 + T) // N + 1  # the blocks this chunk may write, the incomplete one included
        if not isinstance(capacity, jax.core.Tracer) and n_slots > M - int(capacity):
            raise ValueError(f"landmark: a chunk of {T} tokens is longer than the block memory was made for "
                             f"(init_memory max_chunk)")
        q, k, v = self._qkv(x)
        start = (jnp.minimum(n, cfg.mem_topk + 1) if cfg.remap else n) * N
        # Local keys: the N slots of the incomplete block (the first loc_len written) ++ the chunk.
        loc_k = jnp.concatenate([state["loc_k"].astype(k.dtype), k], axis=1)
        loc_v = jnp.concatenate([state["loc_v"].astype(v.dtype), v], axis=1)
        key_idx = jnp.arange(N + T)
        key_pos = jnp.where(key_idx < N, start + key_idx, start + loc_len + key_idx - N)
        key_valid = (key_idx >= N) | (key_idx < loc_len)
        true_pos = pos - loc_len + jnp.where(key_idx < N, key_idx, loc_len + key_idx - N)
        is_lm = is_landmark_position(true_pos, cfg.block_len) & key_valid
        q_rot = apply_rope(q, start + loc_len + jnp.arange(T), cfg.rope_theta)
        k_rot = _rotate(loc_k, jnp.broadcast_to(key_pos[None, :, None], loc_k.shape[:3]), cfg.rope_theta)
        scale = self.head_dim**-0.5
        s_loc = jnp.einsum("bthk,bshk->bhts", q_rot.astype(jnp.float32), k_rot.astype(jnp.float32)) * scale
        # Blocks completed in this chunk move to the cache; the rest becomes the new incomplete block.
        total = loc_len + T
        n_new = total // N
        seq_k = jax.lax.dynamic_update_slice(jnp.zeros((B, n_slots * N) + k.shape[2:], k.dtype),
                                             state["loc_k"].astype(k.dtype), (0, 0, 0, 0))
        seq_k = jax.lax.dynamic_update_slice(seq_k, k, (0, loc_len, 0, 0))
        seq_v = jax.lax.dynamic_update_slice(jnp.zeros((B, n_slots * N) + v.shape[2:], v.dtype),
                                             state["loc_v"].astype(v.dtype), (0, 0, 0, 0))
        seq_v = jax.lax.dynamic_update_slice(seq_v, v, (0, loc_len, 0, 0))
        blocks_k = seq_k.reshape(B, n_slots, N, *k.shape[2:])
        blocks_v = seq_v.reshape(B, n_slots, N, *v.shape[2:])
        # Block n + i goes to slot (n + i) % M: the ring buffer. Those slots hold blocks older than the last
        # max_blocks (M - max_blocks >= n_slots), so nothing kept is overwritten.
        slots = (n + jnp.arange(n_slots)) % M
        mem_k = state["mem_k"].at[:, slots].set(blocks_k.astype(state["mem_k"].dtype))
        mem_v = state["mem_v"].at[:, slots].set(blocks_v.astype(state["mem_v"].dtype))
        lm_k = blocks_k[:, :, -1]
        lm_k = _rotate(lm_k, jnp.broadcast_to(self._landmark_base_positions(n + jnp.arange(n_slots))[None, :, None],
                                              lm_k.shape[:3]), cfg.rope_theta)
        mem_lm_k = state["mem_lm_k"].at[:, :, slots].set(lm_k.swapaxes(1, 2).astype(state["mem_lm_k"].dtype))
        # The cache write comes before the retrieval reads: the new blocks land in slots that retrieval masks (not
        # yet counted, or evicted), and reading the written buffer lets XLA update it in place (no O(cache) copy).
        written = dict(state, mem_k=mem_k, mem_v=mem_v, mem_lm_k=mem_lm_k)
        s_mem, v_mem, mem_valid, _ = self._retrieve(written, q_rot.astype(jnp.float32))
        bcast = lambda a: jnp.broadcast_to(a[None], (B,) + a.shape)  # noqa: E731
        w_loc, w_mem = grouped_softmax(s_loc, bcast(is_lm), N + jnp.arange(T), s_mem, mem_valid, bcast(key_valid))
        o = jnp.einsum("bhts,bshv->bthv", w_loc, loc_v.astype(jnp.float32))
        o = o + jnp.einsum("bhtmn,bhtmnv->bthv", w_mem, v_mem.astype(jnp.float32))
        y = self._out(o.astype(x.dtype))

        new_loc_k = jax.lax.dynamic_slice_in_dim(jnp.concatenate([seq_k, jnp.zeros_like(seq_k[:, :N])], 1),
                                                 n_new * N, N, axis=1)
        new_loc_v = jax.lax.dynamic_slice_in_dim(jnp.concatenate([seq_v, jnp.zeros_like(seq_v[:, :N])], 1),
                                                 n_new * N, N, axis=1)
        y = jnp.where(n_slots <= M - capacity, y, jnp.full((), jnp.nan, y.dtype))
        new_state = dict(state, mem_k=mem_k, mem_v=mem_v, mem_lm_k=mem_lm_k, n_blocks=n + n_new,
                         loc_k=new_loc_k.astype(state["loc_k"].dtype), loc_v=new_loc_v.astype(state["loc_v"].dtype),
                         pos=pos + T)
        return new_state, y

    def memory_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]:
        """One token with retrieval; memory_prefill of a chunk of 1."""
        state, y = self.memory_prefill(state, x_t[:, None])
        return state, y[:, 0]
