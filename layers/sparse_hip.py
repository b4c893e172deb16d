"""hip: HiP attention's hierarchical top-k block pruning, training-free (Lee et al., "HiP Attention: Sparse
Sub-Quadratic Attention with Hierarchical Attention Pruning", arXiv 2406.09827 §3). Written from the paper; the
official code was not read.

HiP estimates the top-k keys of a query by a tree search that relies on "attention locality" (neighbouring keys
score alike, §3): the causal context is cut into k branches; every iteration halves each branch, scores each half by
one representative key, and keeps the k best halves, so after log2(T / k) iterations k small pieces remain. Here the
pieces are key blocks of `block_size` tokens, and the search runs per KV head and query row: `hip_query_block` (b_q,
a divisor of block_size, default block_size) consecutive queries that share one list, as the paper's query blocks
share a mask. For a row inside key block I:

- the candidates are the earlier blocks [s, I), s = min(`sink_blocks`, I); block I (the diagonal) and the sink blocks
  before it are always read, and the row reads k blocks in all (`top_k`, or SeerAttention's rule from `density` over
  the nB key blocks, layers/sparse_select.py), so the search keeps m = min(k - 1 - s, I - s) of the candidates (all
  of them when k covers the row: then the row is dense causal attention);
- the initial branches are the candidate range cut into m contiguous runs of near-equal length (branch j holds
  blocks s + floor(j·n / m) ... s + floor((j + 1)·n / m) - 1, n = I - s);
- an iteration halves every branch of two or more blocks [a, b) into [a, a + ceil((b - a) / 2)) and the rest (a
  one-block branch stays whole), scores every half by its representative key and keeps the m best halves (ties: the
  earlier half); ceil(log2(nB)) iterations leave m one-block branches, the selected blocks;
- the representative key of the half covering tokens [a·bs, b·bs) is its centre token floor((a + b)·bs / 2), the
  paper's choice (§3: the middle of a chunk stands for the chunk, by attention locality); `hip_representative:
  first` takes the half's first token a·bs instead;
- a half's score is the largest q·k_rep over the row's queries and the query heads of the KV head's GQA group
  (post-RoPE q and k, what attention uses), so the row shares one list and so does the group, as mean_topk's "max"
  reduction (a choice: the paper masks per head).

Cost: ceil(log2 nB) iterations of 2m representative keys against b_q queries per row: O(T·m·log T·K) per head and no
[T, T] (nor [nB, nB]) buffer. No parameters.

Causality, and how decoding relates to the parallel form. With b_q > 1 a half's score is a max over every query of
the row, the later ones too, so the selection is not causal at token level: a token's list is chosen with the
queries of the next tokens of its row, which in a language model carry the very tokens it predicts (on the byte LM
of docs/layers.md, rows of 16 score a perplexity 0.5% lower than rows of one). With b_q = 1 every token has its own
list and the layer is exactly causal. Decoding uses the queries seen so far: the decode state keeps the
queries of the newest row ([B, b_q, Hq, K]), and a call whose last token is at position e runs the search for each
row it touches with that row's queries at positions <= e, and with k for the e + 1 tokens known. So the output at
position p of a call ending at e equals the parallel form over the prefix x[:e + 1] at p: one prefill of the whole
prompt gives the parallel form exactly, token-by-token decoding gives at every p the parallel form of x[:p + 1], the
tokens that end a row agree with the whole sequence's parallel form, and with b_q = 1 every token does
(tests/layers/test_sparse_hip.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from effarch.layers import sparse_select
from effarch.pallas_kernels.block_sparse import block_sparse_attention


class HipPolicy(nnx.Module):
    """The `hip` pattern of `sparse_attention` (layers/sparse_attention.py dispatches to it); no parameters."""

    def __init__(self, config, *, n_heads: int, n_kv_heads: int, head_dim: int, rngs: nnx.Rngs):
        del rngs  # no parameters
        self.block = config.block_size
        self.q_block = config.hip_query_block or config.block_size  # b_q: the queries that share one list
        self.top_k, self.density, self.sink_blocks = config.top_k, config.density, config.sink_blocks
        self.representative = config.hip_representative
        self.implementation = config.implementation
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def _k(self, n_blocks: int):
        """(k table over nB = 0..n_blocks, static list width, static branch count)."""
        table = sparse_select.k_table(n_blocks, top_k=self.top_k, density=self.density)
        kmax = max(int(table.max()), 1 + self.sink_blocks)
        return table, kmax, max(min(int(table.max()) - 1, n_blocks - 1), 0)

    def __call__(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv Dv"], *,
                 q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"],
                 positions: Int[Array, " T"]) -> Float[Array, "B T Hq Dv"]:
        """Parallel form from position 0 (q_raw, k_raw, positions unused)."""
        del q_raw, k_raw, positions
        idx, cnt = self.select(q, k)
        return block_sparse_attention(q, k, v, idx, cnt, q_block=self.q_block, kv_block=self.block, causal=True,
                                      implementation=self.implementation)

    def select(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"]) -> tuple[
            Int[Array, "B Hkv nR Kmax"], Int[Array, "B Hkv nR"]]:
        """The parallel form's lists: one per KV head and query row of hip_query_block tokens (nR = ceil(T / b_q))."""
        B, T, Hq, K = q.shape
        bq, nb = self.q_block, -(-T // self.block)
        nr = -(-T // bq)
        rows = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, nr * bq - T), (0, 0), (0, 0))).reshape(B, nr, bq, Hq, K)
        valid = (jnp.arange(nr * bq) < T).reshape(nr, bq)
        table, kmax, n_branches = self._k(nb)
        return self.search(rows, valid, jnp.arange(nr) * bq // self.block, k, int(table[nb]), kmax=kmax,
                           n_branches=n_branches)

    def search(self, q_rows: Float[Array, "B R bq Hq K"], q_valid: Bool[Array, "R bq"], row_block: Int[Array, " R"],
               k: Float[Array, "B S Hkv K"], k_sel, *, kmax: int, n_branches: int) -> tuple[
                   Int[Array, "B Hkv R W"], Int[Array, "B Hkv R"]]:
        """The hierarchical search (module docstring) for query rows: row r lies in key block row_block[r] and has
        the queries q_rows[:, r] where q_valid[r] (the others are ignored); keys k in blocks of block_size (the
        candidates J < row_block[r] must be whole blocks of k). k_sel: blocks per row (int, or traced when
        decoding); n_branches: static bound on the branches m; the list width W is min(kmax, nB of k).

        Returns (idx, cnt): the diagonal first, then the sink blocks, then the found blocks (best scored in the
        last iteration first); entries past cnt are padding."""
        B, R, bq, Hq, K = q_rows.shape
        bs, S, Hkv = self.block, k.shape[1], k.shape[2]
        nb = -(-S // bs)
        diag = jnp.minimum(jnp.asarray(row_block, jnp.int32), nb - 1)  # I; rows past the cache end: clipped, unused
        s = jnp.minimum(self.sink_blocks, diag)  # the candidates are [s, I)
        n = diag - s
        m = jnp.clip(jnp.asarray(k_sel, jnp.int32) - 1 - s, 0, jnp.minimum(n, n_branches))  # [R]
        kb = max(n_branches, 1)
        j = jnp.arange(kb, dtype=jnp.int32)
        mm = jnp.maximum(m, 1)[:, None]
        active = j[None, :] < m[:, None]  # [R, kb]
        lo = jnp.where(active, s[:, None] + j[None, :] * n[:, None] // mm, 0)
        hi = jnp.where(active, s[:, None] + (j[None, :] + 1) * n[:, None] // mm, 0)
        lo, hi = (jnp.broadcast_to(a[None, None], (B, Hkv, R, kb)) for a in (lo, hi))

        qg = q_rows.astype(jnp.float32).reshape(B, R, bq, Hkv, Hq // Hkv, K)
        kt = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, S, K]
        neg = jnp.full((), -jnp.inf, jnp.float32)

        def halve(_, branches):  # one iteration: halve every branch, score the halves, keep the m best
            lo, hi = branches
            mid = lo + (hi - lo + 1) // 2
            c_lo = jnp.stack([lo, mid], -1).reshape(B, Hkv, R, 2 * kb)
            c_hi = jnp.stack([mid, hi], -1).reshape(B, Hkv, R, 2 * kb)
            rep = (c_lo + c_hi) * bs // 2 if self.representative == "center" else c_lo * bs
            rep = jnp.clip(rep, 0, S - 1)
            k_rep = jnp.take_along_axis(kt, rep.reshape(B, Hkv, R * 2 * kb, 1), axis=2).reshape(B, Hkv, R, 2 * kb, K)
            s_all = jnp.einsum("BHRCK,BRiHgK->BHRCig", k_rep, qg)
            s_all = jnp.where(q_valid[None, None, :, None, :, None], s_all, neg)
            scores = jnp.where(c_hi > c_lo, s_all.max(axis=(-2, -1)), neg)
            _, order = jax.lax.top_k(scores, kb)  # ties: the earlier half (lax.top_k keeps the lower index first)
            return (jnp.where(active, jnp.take_along_axis(c_lo, order, axis=-1), 0),
                    jnp.where(active, jnp.take_along_axis(c_hi, order, axis=-1), 0))

        # ceil(log2(length)) <= bit_length(nB - 1) halvings leave one block per branch; more change nothing.
        lo, hi = jax.lax.fori_loop(0, max(nb - 1, 1).bit_length(), halve, (lo, hi))

        # Lists: [diagonal | sink blocks | found blocks], the valid entries moved to the front in that order.
        n_sink = min(self.sink_blocks, nb)
        sinks = jnp.arange(n_sink, dtype=jnp.int32)
        entries = jnp.concatenate([jnp.broadcast_to(diag[None, None, :, None], (B, Hkv, R, 1)),
                                   jnp.broadcast_to(sinks, (B, Hkv, R, n_sink)), lo], axis=-1)
        valid = jnp.concatenate([jnp.ones((R, 1), bool), sinks[None, :] < s[:, None], active], axis=-1)
        W = entries.shape[-1]
        width = max(1, min(kmax, W, nb))
        key = jnp.where(valid, W - jnp.arange(W), -1)
        _, order = jax.lax.top_k(key, width)  # [R, width]: the valid entries in their order
        idx = jnp.take_along_axis(entries, jnp.broadcast_to(order, (B, Hkv, R, width)), axis=-1)
        cnt = jnp.minimum(valid.sum(-1), width).astype(jnp.int32)
        return idx.astype(jnp.int32), jnp.broadcast_to(cnt, (B, Hkv, R))

    # --- decoding over the layer's KV cache ----------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> dict:
        """{"q_row": [B, b_q, Hq, K] float32}: the queries of the newest query row seen (slot = position % b_q)."""
        del max_len, cache_dtype  # one row's queries, kept in float32 as the parallel form scores them
        return {"q_row": jnp.zeros((batch_size, self.q_block, self.n_heads, self.head_dim), jnp.float32)}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes per sequence of `init_state`: hip_query_block · Hq · K · 4, whatever the length."""
        del seq_len, cache_dtype
        return self.q_block * self.n_heads * self.head_dim * 4

    def decode(self, state: dict, q: Float[Array, "B Tn Hq K"], k_cache: Float[Array, "B S Hkv K"],
               v_cache: Float[Array, "B S Hkv Dv"], *, q_raw: Float[Array, "B Tn Hq K"],
               k_raw: Float[Array, "B Tn Hkv K"], q_pos: Int[Array, " Tn"]) -> tuple[dict, Float[Array, "B Tn Hq Dv"]]:
        """New tokens at positions q_pos (consecutive) over the cache, which already holds their k, v; slots past
        q_pos[-1] are not yet written (the causal predicate hides them). Returns (state, o); see the module
        docstring for how this relates to the parallel form."""
        del q_raw, k_raw
        B, Tn = q.shape[:2]
        bs, bq, S = self.block, self.q_block, k_cache.shape[1]
        nb = -(-S // bs)
        first, last = q_pos[0], q_pos[-1]
        R = (Tn + bq - 2) // bq + 1  # the most query rows Tn consecutive tokens touch
        row = first // bq + jnp.arange(R, dtype=jnp.int32)
        P = row[:, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :]  # [R, bq] the rows' positions
        new = jnp.take(q.astype(jnp.float32), jnp.clip(P - first, 0, Tn - 1).reshape(-1), axis=1)
        new = new.reshape(B, R, bq, *q.shape[2:])
        # Positions before the call belong to its first row: their queries are the state's (same slot).
        old = jnp.broadcast_to(state["q_row"][:, None], new.shape)
        valid = P <= last
        q_rows = jnp.where((P < first)[None, :, :, None, None], old, jnp.where(valid[None, :, :, None, None], new, 0))
        table, kmax, n_branches = self._k(nb)
        k_now = jnp.asarray(table)[jnp.minimum(last // bs + 1, nb)]
        idx, cnt = self.search(q_rows, valid, row * bq // bs, k_cache, k_now, kmax=kmax, n_branches=n_branches)
        tok_row = q_pos // bq - first // bq  # each token's row
        o = block_sparse_attention(q, k_cache, v_cache, idx[:, :, tok_row], cnt[:, :, tok_row], q_block=1,
                                   kv_block=bs, causal=True, q_pos=q_pos, implementation=self.implementation)
        newest = jax.lax.dynamic_index_in_dim(q_rows, last // bq - first // bq, axis=1, keepdims=False)
        return {"q_row": newest}, o
