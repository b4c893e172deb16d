"""`longheads`: each query head reads its own top chunks, laid out contiguously at re-assigned positions inside the
trained window (LongHeads, arXiv 2402.10685, §3; LuLuLuyi/LongHeads `modeling_longheads/modeling_llama.py`).

The cache is split into chunks of `chunk` tokens aligned at 0. When a chunk is complete the policy stores its
representation per query head (§3.2, as the official code computes it): attention inside the chunk with chunk-local
RoPE positions (t mod chunk) and no causal mask gives outputs o_i; their mean c summarises the chunk; the chunk key is
the attention-pooled local keys, k_c = Σ_j softmax_j(c·k_j / √d) k_j. At a decode step, query head h scores the
complete chunks by q·k_c with its unrotated query (the official code's scoring) and reads n = min(budget, train_len)
// chunk chunks: the first chunk, the previous (last complete) one and the current partial one always, the best
scored others up to n. The chosen chunks are laid out in position order at positions 0, chunk, 2·chunk, ..., the
current chunk last, and the query sits right after its own key: every relative distance is below n·chunk <= train_len
(the trained window), however long the context. The cache holds keys rotated at their true positions, so the read
keys are re-rotated by their chunk's offset (`sparse_decode_attention`'s key_shift: R(p') = R(p' − p)·R(p)) and the
query by its own; one list per query head (Hs = Hq; a GQA group's union is loaded).

While the context fits in n chunks every chunk is read at its true position: the full cache. Differences from the
official code: selection at decode only (prefill stays dense, as every policy here; the official code also selects
while encoding past `begin_selective_length`); the budget caps the chunks (`atten_length / window_size` there).
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection, reads_of
from effarch.pallas_kernels.block_sparse import sparse_decode_attention
from effarch.pallas_kernels.block_sparse.decode import rotate_by


@dataclasses.dataclass(frozen=True)
class LongHeadsPolicy(KVPolicy):
    NAME = "longheads"
    chunk: int = 32  # tokens per chunk (the official window_size is 256, for 4k-trained Llama-2)
    train_len: int = 4096  # the trained window: the re-assigned positions stay below it
    _rope: tuple | None = None  # the layer's RoPE frequencies (bind_rope; () = no RoPE), not an option

    def __post_init__(self):
        super().__post_init__()
        if self.chunk < 1 or min(self.budget, self.train_len) < self.chunk:
            raise PolicyError(f"kv policy longheads: need 1 <= chunk <= min(budget, train_len) (the current chunk is "
                              f"always read), got chunk={self.chunk}, budget={self.budget}, train_len={self.train_len}")

    @property
    def n_chunks(self) -> int:
        """Chunks read per step, the current one included."""
        return min(self.budget, self.train_len) // self.chunk

    def bind_rope(self, freqs):
        return dataclasses.replace(self, _rope=tuple(freqs))

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        n_heads = n_kv_heads if n_heads is None else n_heads
        w = self.chunk
        # chunk keys k_c, head-major: a decode step scores each head's row of them with one matrix-vector product
        return {"keys": jnp.zeros((batch, n_heads, -(-max_len // w), head_dim), jnp.float32),
                # the current (partial) chunk's q, k, v as written (rotated at their true positions)
                "buf_q": jnp.zeros((batch, w, n_heads, head_dim), jnp.float32),
                "buf_k": jnp.zeros((batch, w, n_kv_heads, head_dim), jnp.float32),
                "buf_v": jnp.zeros((batch, w, n_kv_heads, head_dim), jnp.float32)}

    def _freqs(self):
        if self._rope is None:
            raise PolicyError("kv policy longheads: give it to a model (DecoderLM.set_kv_policy), whose attention "
                              "layers hand it their RoPE frequencies")
        return jnp.asarray(self._rope, jnp.float32) if self._rope else None

    def _rotate(self, x, delta):
        freqs = self._freqs()
        return x.astype(jnp.float32) if freqs is None else rotate_by(x, jnp.broadcast_to(delta, x.shape[:-1]), freqs)

    def observe(self, state, q_new, k_new, v_new, pos):
        """Appends the T new tokens to the current chunk; every chunk they complete gets its chunk key."""
        B, T = k_new.shape[:2]
        w = self.chunk
        pos = jnp.asarray(pos, jnp.int32)
        r0 = pos % w  # tokens of the current chunk already written
        m = -(-(w + T) // w) * w  # the buffer, then the new tokens, in whole chunks

        def joined(buf, new):
            out = jnp.zeros((B, m, *buf.shape[2:]), jnp.float32).at[:, :w].set(buf)
            return jax.lax.dynamic_update_slice(out, new.astype(jnp.float32), (0, r0, 0, 0))

        q, k, v = joined(state["buf_q"], q_new), joined(state["buf_k"], k_new), joined(state["buf_v"], v_new)
        # Chunk-local RoPE: slot j of chunk c sits at true position pos − r0 + c·w + (j mod w); rotate to j mod w.
        back = -(pos - r0 + (jnp.arange(m, dtype=jnp.int32) // w) * w)
        keys = chunk_keys(self._rotate(q, back[None, :, None]), self._rotate(k, back[None, :, None]), v, w)
        n_c = m // w
        complete = (jnp.arange(n_c) + 1) * w <= r0 + T
        target = jnp.where(complete, pos // w + jnp.arange(n_c), state["keys"].shape[2])  # incomplete: dropped
        new_keys = state["keys"].at[:, :, target].set(jnp.swapaxes(keys, 1, 2), mode="drop")
        last = (r0 + T) // w  # the chunk that is now partial (or empty)

        def rest(x):
            return jax.lax.dynamic_slice_in_dim(x, last * w, w, axis=1)

        return {"keys": new_keys, "buf_q": rest(q), "buf_k": rest(k), "buf_v": rest(v)}

    def select(self, state, q, k_cache, length):
        """(parts, state); the part's key shifts and the query's shift are `_layout`'s."""
        return [self._layout(state, q, length)[0]], state

    def _layout(self, state, q, length):
        """(Selection of chunks per query head in position order, key_shift [B, Hq, n], query shift (scalar))."""
        B, Hq, K = q.shape
        w, n = self.chunk, self.n_chunks
        length = jnp.asarray(length, jnp.int32)
        last = (length - 1) // w  # the current chunk: always read, laid out last
        n_all = state["keys"].shape[2]
        q_raw = self._rotate(q, -(length - 1))  # the unrotated query scores the chunks
        score = jnp.einsum("BHK,BHCK->BHC", q_raw, state["keys"])
        j = jnp.arange(n_all)
        forced = (j == 0) | (j == last - 1)  # the first and the previous chunk
        score = jnp.where(forced[None, None, :], jnp.inf, score)
        score = jnp.where((j < last)[None, None, :], score, -jnp.inf)  # complete chunks only
        k = min(n - 1, n_all)
        used = jnp.minimum(k, last)  # chunks read besides the current one
        if k > 0:
            _, top = jax.lax.top_k(score, k)  # [B, Hq, k]; the complete chunks first
            top = jnp.sort(jnp.where(jnp.arange(k) < used, top, n_all), axis=-1)  # position order, unused last
        else:
            top = jnp.zeros((B, Hq, 0), jnp.int32)
        slot = jnp.arange(k + 1)[None, None, :]
        idx = jnp.where(slot == used, last, jnp.where(slot < used, jnp.pad(top, ((0, 0), (0, 0), (0, 1))), 0))
        idx = idx.astype(jnp.int32)
        cnt = jnp.broadcast_to(used + 1, (B, Hq)).astype(jnp.int32)
        key_shift = jnp.where(slot < used + 1, (slot - idx) * w, 0).astype(jnp.int32)
        q_shift = (used - last) * w  # the current chunk moves from last·w to used·w, the query with it
        return Selection(idx, cnt, "block", w), key_shift, q_shift

    def attend(self, state, q, k_cache, v_cache, length):
        part, key_shift, q_shift = self._layout(state, q, length)
        freqs = self._freqs()
        if freqs is not None:  # without RoPE, positions do not enter the logits: nothing to re-rotate
            q = self._rotate(q, q_shift).astype(q.dtype)
        o, _ = sparse_decode_attention(q, k_cache, v_cache, part.idx, part.cnt, granularity="block", block=self.chunk,
                                       lengths=jnp.broadcast_to(jnp.asarray(length, jnp.int32), (q.shape[0],)),
                                       implementation=self.implementation,
                                       key_shift=None if freqs is None else key_shift, rope_freqs=freqs)
        return o, state, reads_of([part], length)


def chunk_keys(q, k, v, w: int):
    """Chunk keys [B, n, Hq, K] of chunks of w tokens: q [B, n·w, Hq, K], k [B, n·w, Hkv, K] (chunk-local RoPE), v
    [B, n·w, Hkv, V] with V = K. Non-causal attention inside each chunk gives o_i; c = mean_i o_i; k_c =
    Σ_j softmax_j(c·k_j/√K) k_j (LongHeads §3.2; c lives in value space and scores keys, as in the official code)."""
    B, L, Hq, K = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qc = q.reshape(B, L // w, w, Hkv, G, K)
    kc = k.reshape(B, L // w, w, Hkv, K)
    vc = v.reshape(B, L // w, w, Hkv, -1)
    s = jnp.einsum("BNiHGK,BNjHK->BNHGij", qc, kc) * K**-0.5
    o = jnp.einsum("BNHGij,BNjHV->BNHGiV", jax.nn.softmax(s, axis=-1), vc)
    c = jnp.mean(o, axis=-2)  # [B, N, Hkv, G, V]
    p = jax.nn.softmax(jnp.einsum("BNHGV,BNjHV->BNHGj", c, kc) * K**-0.5, axis=-1)
    return jnp.einsum("BNHGj,BNjHK->BNHGK", p, kc).reshape(B, L // w, Hq, K)
