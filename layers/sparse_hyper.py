"""HyperAttention: the `hyper` policy of the sparse_attention mixer, an approximation of causal softmax attention.

Paper: Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention: Long-context Attention in Near-Linear
Time", ICLR 2024 (arXiv 2310.05869): Algorithm 1 (sortLSH), Algorithm 2 (the approximate D and A·V), Algorithm 4
(causal masking by recursive halving). Official code read for details: insuhan/hyper-attn
(`models/attention/hyper_attn.py`, `angular_lsh.py`); its CPU path is the one followed here.

Non-causal approximation of the attention of queries Q [n_q] over keys K [n_k] (`_noncausal`), per query head:

1. sortLSH: hash(x) = gray[Σ_i [x·r_i > 0] 2^i] with `hyper_lsh_bits` fixed Gaussian directions r_i (the
   `LSHProjection` buffer [K, bits], drawn from `hyper_seed`: a constant, not a parameter, shared by the heads as in
   the official code) and gray[b] = b XOR (b >> 1), the reflected Gray sequence of the official
   `_unit_hamming_distance_array`. Sorting by gray[bin] orders the buckets 0, 1, 3, 2, 7, 6, 4, 5, ... (the inverse
   Gray map), which is the official order; it is not a unit-Hamming path for 3 or more bits, and is kept as it is.
   Queries and keys are sorted separately (stable).
2. Block-diagonal: the sorted keys in blocks of `block_size`, the sorted queries in as many blocks (ceil(n_q / nK)
   queries each; the official code reshapes a padded query array instead, which needs that ratio to be whole);
   exact attention within each diagonal block pair through `block_sparse_attention` with lists [I] on the sorted
   layout and the original positions (padding has position −1, so it is masked, where the official code gives its
   zero keys weight) -> (o1, lse1).
3. Residual: `hyper_samples` key indices drawn uniformly with replacement (Algorithm 2 samples by the row norms of
   V; the official code and this one sample uniformly), exact attention of every query over them with the samples
   that fall in the query's own diagonal block masked (the official CPU path; its CUDA path double counts them), and
   lse2 += log(n_k / m), an unbiased estimate of the rest of the softmax denominator -> (o2, lse2). It runs when
   m > 0 and both sides have more than one block, as in the official code.
4. `merge_attention`, then the rows go back to the original order.

The samples come from a key fixed by hyper_seed and the call's shape (the official code draws fresh ones at every
call), so the layer is a deterministic function of its inputs.

Causal (`_causal`, Algorithm 4): n ≤ `hyper_min_seq_len` -> exact causal attention; else split at h = ceil(n / 2)
(the official code pads n to even, the same split), recurse on both diagonal halves, approximate the second half's
queries over the first half's keys with the non-causal step (which is exact while n_q < hyper_min_seq_len), and
merge the second half by LSE. So the parallel form is exact causal attention unless some level has
floor(n / 2) ≥ hyper_min_seq_len.

Causality: every key a query sees is at or before it, but where a query lands among the sorted blocks depends on the
hashes of the other queries of its half, later ones included, so an output can change when a later token changes
(the paper's Algorithm 4 has this property; the CAB prefix test fails). Decoding (`decode`) therefore does not
replay the approximation: it is exact causal attention over the KV cache, equal to the parallel form whenever that
is exact, and otherwise differing by the approximation error (tests/layers/test_sparse_hyper.py).

Heads: queries are hashed and sorted per query head, so each query head is its own batch row of the op and a GQA
group's keys are repeated for its query heads (Hq / Hkv times the key bytes).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse import block_sparse_attention, merge_attention
from effarch.pallas_kernels.block_sparse.reference import masked_softmax


class LSHProjection(nnx.Variable):
    """The fixed Gaussian directions [K, bits] of sortLSH (not trained, not saved: rebuilt from hyper_seed)."""


def gray_code(bits: int) -> np.ndarray:
    """The reflected Gray sequence of 2^bits entries: gray[b] = b XOR (b >> 1)."""
    b = np.arange(2**bits)
    return (b ^ (b >> 1)).astype(np.int32)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_rows(x: Array, n: int, value=0) -> Array:
    """Pads axis 1 of x to n entries."""
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=value)


def _masked_attention(q: Float[Array, "N Tq K"], k: Float[Array, "N S K"], v: Float[Array, "N S Dv"],
                      mask: Array, scale: float) -> tuple[Float[Array, "N Tq Dv"], Float[Array, "N Tq"]]:
    """Dense softmax attention over the keys where mask [N, Tq, S] holds, float32, with its lse (−inf and o = 0 on
    empty rows, finite gradients: the double-where rule of the op's reference)."""
    s = jnp.einsum("ntk,nsk->nts", q, k, preferred_element_type=jnp.float32) * scale
    p, lse = masked_softmax(s, mask)
    return jnp.einsum("nts,nsv->ntv", p, v.astype(jnp.float32)), lse


def _merge(o1, lse1, o2, lse2):
    """merge_attention on [N, T, Dv] / [N, T] parts (the op's layout has a heads axis: one here)."""
    o, lse = merge_attention(o1[:, :, None], lse1[:, :, None], o2[:, :, None], lse2[:, :, None])
    return o[:, :, 0], lse[:, :, 0]


class HyperPolicy(nnx.Module):
    """HyperAttention (module docstring) for q [B, T, Hq, K], k [B, T, Hkv, K], v [B, T, Hkv, Dv].

    Attributes:
      projection: LSHProjection [K, hyper_lsh_bits].
    """

    def __init__(self, config, *, n_heads: int, n_kv_heads: int, head_dim: int, rngs: nnx.Rngs):
        del rngs  # the LSH directions come from hyper_seed, so a rebuilt layer (decoding a checkpoint) has the same
        self.block = config.block_size
        self.bits = config.hyper_lsh_bits
        self.samples = config.hyper_samples
        self.min_seq_len = config.hyper_min_seq_len
        self.seed = config.hyper_seed
        self.implementation = config.implementation
        self.projection = LSHProjection(
            jax.random.normal(jax.random.key(config.hyper_seed), (head_dim, self.bits), jnp.float32))

    def hash(self, x: Float[Array, "... K"]) -> Int[Array, "..."]:
        """sortLSH bucket (the key the tokens are sorted by): gray[Σ_i [x·r_i > 0] 2^i]."""
        proj = jnp.einsum("...k,kr->...r", x.astype(jnp.float32), self.projection[...])
        bins = (proj > 0).astype(jnp.int32) @ jnp.asarray(1 << np.arange(self.bits), jnp.int32)
        return jnp.asarray(gray_code(self.bits))[bins]

    # --- exact parts -----------------------------------------------------------------------------------------------

    def _exact(self, q, k, v, q_pos, k_pos, *, causal: bool):
        """Exact attention of q [N, Tq, K] over k, v [N, S, ·] (one block of the op), with lse [N, Tq]."""
        N, Tq, S = q.shape[0], q.shape[1], k.shape[1]
        idx = jnp.zeros((N, 1, 1, 1), jnp.int32)
        cnt = jnp.ones((N, 1, 1), jnp.int32)
        o, lse = block_sparse_attention(q[:, :, None], k[:, :, None], v[:, :, None], idx, cnt, q_block=Tq,
                                        kv_block=S, causal=causal, q_pos=q_pos, kv_pos=k_pos, return_lse=True,
                                        implementation=self.implementation)
        return o[:, :, 0], lse[:, :, 0]

    # --- the approximation -----------------------------------------------------------------------------------------

    def _noncausal(self, q, k, v, q_pos, k_pos):
        """Steps 1-4 of the module docstring for q [N, nq, K] over k, v [N, nk, ·] (all keys visible)."""
        N, nq, K = q.shape
        nk = k.shape[1]
        if self.min_seq_len > nq:
            return self._exact(q, k, v, q_pos, k_pos, causal=False)
        bk = self.block
        n_blocks = _ceil_div(nk, bk)
        bq = _ceil_div(nq, n_blocks)
        q_order = jnp.argsort(self.hash(q), axis=1, stable=True)  # [N, nq]
        k_order = jnp.argsort(self.hash(k), axis=1, stable=True)

        def sort(x, order):
            return jnp.take_along_axis(x, order[..., None], axis=1)

        q_s, k_s, v_s = sort(q, q_order), sort(k, k_order), sort(v, k_order)
        qp = _pad_rows(jnp.take_along_axis(jnp.broadcast_to(q_pos, (N, nq)), q_order, axis=1), n_blocks * bq, -1)
        kp = _pad_rows(jnp.take_along_axis(jnp.broadcast_to(k_pos, (N, nk)), k_order, axis=1), n_blocks * bk, -1)
        idx = jnp.broadcast_to(jnp.arange(n_blocks, dtype=jnp.int32)[None, None, :, None], (N, 1, n_blocks, 1))
        cnt = jnp.ones((N, 1, n_blocks), jnp.int32)
        o, lse = block_sparse_attention(
            _pad_rows(q_s, n_blocks * bq)[:, :, None], _pad_rows(k_s, n_blocks * bk)[:, :, None],
            _pad_rows(v_s, n_blocks * bk)[:, :, None], idx, cnt, q_block=bq, kv_block=bk, causal=False, q_pos=qp,
            kv_pos=kp, return_lse=True, implementation=self.implementation)
        o, lse = o[:, :nq, 0], lse[:, :nq, 0]

        m = self.samples
        if m > 0 and nq > bq and nk > bk:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), nq), nk)
            sampled = jax.random.randint(key, (N, m), 0, nk)  # indices into the sorted keys
            k_sub = jnp.take_along_axis(k_s, sampled[..., None], axis=1)
            v_sub = jnp.take_along_axis(v_s, sampled[..., None], axis=1)
            other_block = (jnp.arange(nq)[None, :, None] // bq) != (sampled[:, None, :] // bk)  # [N, nq, m]
            o2, lse2 = _masked_attention(q_s, k_sub, v_sub, other_block, K**-0.5)
            o, lse = _merge(o.astype(jnp.float32), lse, o2, lse2 + math.log(nk / m))
        inverse = jnp.argsort(q_order, axis=1)
        return (jnp.take_along_axis(o, inverse[..., None], axis=1).astype(q.dtype),
                jnp.take_along_axis(lse, inverse, axis=1))

    def _causal(self, q, k, v, pos):
        """Algorithm 4: q, k, v [N, n, ·] at positions pos [n]; (o, lse)."""
        n = q.shape[1]
        if n <= self.min_seq_len:
            return self._exact(q, k, v, pos, pos, causal=True)
        h = _ceil_div(n, 2)
        o_top, lse_top = self._causal(q[:, :h], k[:, :h], v[:, :h], pos[:h])
        o_diag, lse_diag = self._causal(q[:, h:], k[:, h:], v[:, h:], pos[h:])
        o_off, lse_off = self._noncausal(q[:, h:], k[:, :h], v[:, :h], pos[h:], pos[:h])
        o_bot, lse_bot = _merge(o_diag, lse_diag, o_off, lse_off)
        return jnp.concatenate([o_top, o_bot], axis=1), jnp.concatenate([lse_top, lse_bot], axis=1)

    def __call__(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv Dv"], *,
                 q_raw=None, k_raw=None, positions=None) -> Float[Array, "B T Hq Dv"]:
        """Parallel form (from position 0). q_raw, k_raw, positions: unused (the hashes read the keys attention
        uses)."""
        del q_raw, k_raw, positions
        B, T, Hq, K = q.shape
        Hkv, Dv = k.shape[2], v.shape[-1]
        G = Hq // Hkv

        def fold(x):  # [B, T, H, D] -> [B·H, T, D]
            return jnp.moveaxis(x, 2, 1).reshape(B * x.shape[2], T, x.shape[3])

        o, _ = self._causal(fold(q), fold(jnp.repeat(k, G, axis=2)), fold(jnp.repeat(v, G, axis=2)),
                            jnp.arange(T, dtype=jnp.int32))
        return jnp.moveaxis(o.reshape(B, Hq, T, Dv), 1, 2)

    # --- decoding --------------------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> dict:
        return {}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        return 0

    def decode(self, state: dict, q: Float[Array, "B Tn Hq K"], k_cache: Float[Array, "B S Hkv K"],
               v_cache: Float[Array, "B S Hkv Dv"], *, q_pos, q_raw=None, k_raw=None
               ) -> tuple[dict, Float[Array, "B Tn Hq Dv"]]:
        """Exact causal attention of the new queries (positions q_pos, [Tn] or [B, Tn]) over the KV cache (slot =
        position; the slots after a query are hidden by the causal predicate). Equal to the parallel form where that
        is exact (module docstring); otherwise it differs by the approximation. Returns (state, o)."""
        del q_raw, k_raw
        B, Tn = q.shape[:2]
        S = k_cache.shape[1]
        n_kv_blocks = _ceil_div(S, self.block)
        idx = jnp.broadcast_to(jnp.arange(n_kv_blocks, dtype=jnp.int32), (B, 1, Tn, n_kv_blocks))
        cnt = jnp.full((B, 1, Tn), n_kv_blocks, jnp.int32)
        o = block_sparse_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), idx, cnt, q_block=1,
                                   kv_block=self.block, causal=True, q_pos=jnp.broadcast_to(q_pos, (B, Tn)),
                                   implementation=self.implementation)
        return state, o
