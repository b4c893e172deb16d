"""mean_topk: the training-free content-based block selection every learned sparse attention is compared against
(MoBA's gate, Lu et al., arXiv 2502.13189 §2.2; Quest's block criticality, Tang et al., arXiv 2406.10774 §3 scores
a block by an upper bound instead of the mean).

Query block I reads key block J by the score mean(q in I) · mean(k in J) (post-RoPE q and k, what attention uses),
computed per KV head and reduced over the query heads of its GQA group by `score_reduce` (max: a block is read if
any head of the group wants it; mean), so one list serves the group. Causal: only J < I compete; the diagonal
block I and the first `sink_blocks` blocks are always read; the row reads k blocks in all (`top_k`, or SeerAttention's
nz_ratio rule from `density`: layers/sparse_select.py). No parameters.

Decoding, and why it differs from the parallel form. Block I's mean query uses every query of the block, the later
ones too, so the selection is not causal at token level (changing token t changes the lists, hence the outputs, of
the earlier tokens of its block). Decoding can only use the queries it has seen: the decode state keeps, per block,
the sum of its queries so far, and a call whose last token is at position e selects for each of its tokens with the
mean over the queries of the token's block at positions <= e, and with k for the e + 1 tokens known. So the output at
position p of a call ending at e equals the parallel form over the prefix x[:e + 1] at p: token-by-token decoding
gives, at every p, the parallel form of x[:p + 1]; one prefill of the whole prompt gives the parallel form exactly;
and the tokens that end a block (or whose block ends the call) agree with the parallel form of the whole sequence
(tests/layers/test_sparse_topk.py).
"""

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers import sparse_select
from effarch.pallas_kernels.block_sparse import block_sparse_attention


class MeanTopkPolicy(nnx.Module):
    """The `mean_topk` pattern of `sparse_attention` (layers/sparse_attention.py dispatches to it); no parameters."""

    def __init__(self, config, *, n_heads: int, n_kv_heads: int, head_dim: int, rngs: nnx.Rngs):
        del rngs  # no parameters
        self.block = config.block_size
        self.top_k, self.density, self.sink_blocks = config.top_k, config.density, config.sink_blocks
        self.reduce = config.score_reduce
        self.implementation = config.implementation
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def _k(self, n_blocks: int):
        """(k table over nB = 0..n_blocks, static list width)."""
        table = sparse_select.k_table(n_blocks, top_k=self.top_k, density=self.density)
        return table, max(int(table.max()), 1 + self.sink_blocks)

    def __call__(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv Dv"], *,
                 q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"],
                 positions: Int[Array, " T"]) -> Float[Array, "B T Hq Dv"]:
        """Parallel form from position 0 (q_raw, k_raw, positions unused)."""
        del q_raw, k_raw, positions
        idx, cnt = self.select(q, k)
        return block_sparse_attention(q, k, v, idx, cnt, q_block=self.block, kv_block=self.block, causal=True,
                                      implementation=self.implementation)

    def select(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"]) -> tuple[
            Int[Array, "B Hkv nB Kmax"], Int[Array, "B Hkv nB"]]:
        """The parallel form's lists: one per KV head and query block."""
        bs, nb = self.block, -(-q.shape[1] // self.block)
        scores = sparse_select.group_scores(sparse_select.block_pool(q, bs), sparse_select.block_pool(k, bs),
                                            self.reduce)
        table, kmax = self._k(nb)
        return sparse_select.topk_lists(scores, jnp.arange(nb), int(table[nb]), kmax=kmax,
                                        sink_blocks=self.sink_blocks)

    # --- decoding over the layer's KV cache ----------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> dict:
        """{"q_sum": [B, ceil(max_len / block), Hq, K] float32}: each block's sum of the queries seen so far."""
        del cache_dtype  # sums stay float32
        nb = -(-max_len // self.block)
        return {"q_sum": jnp.zeros((batch_size, nb, self.n_heads, self.head_dim), jnp.float32)}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes per sequence of `init_state`: ceil(seq_len / block) · Hq · K · 4."""
        return -(-seq_len // self.block) * self.n_heads * self.head_dim * 4

    def decode(self, state: dict, q: Float[Array, "B Tn Hq K"], k_cache: Float[Array, "B S Hkv K"],
               v_cache: Float[Array, "B S Hkv Dv"], *, q_raw: Float[Array, "B Tn Hq K"],
               k_raw: Float[Array, "B Tn Hkv K"], q_pos: Int[Array, " Tn"]) -> tuple[dict, Float[Array, "B Tn Hq Dv"]]:
        """New tokens at positions q_pos (consecutive) over the cache, which already holds their k, v; slots past
        q_pos[-1] are not yet written (the causal predicate hides them). Returns (state, o); see the module
        docstring for how this relates to the parallel form."""
        del q_raw, k_raw
        bs, S = self.block, k_cache.shape[1]
        nb = -(-S // bs)
        qb = q_pos // bs  # each token's block
        q_sum = state["q_sum"].at[:, qb].add(q.astype(jnp.float32), mode="drop")  # past the cache end: dropped
        last = q_pos[-1]
        known = jnp.minimum(last + 1, (qb + 1) * bs) - qb * bs  # queries of the token's block seen so far
        q_mean = q_sum[:, jnp.minimum(qb, nb - 1)] / known[None, :, None, None].astype(jnp.float32)
        scores = sparse_select.group_scores(q_mean, sparse_select.block_pool(k_cache, bs), self.reduce)
        table, kmax = self._k(nb)
        k_now = jnp.asarray(table)[jnp.minimum(last // bs + 1, nb)]
        idx, cnt = sparse_select.topk_lists(scores, qb, k_now, kmax=kmax, sink_blocks=self.sink_blocks)
        o = block_sparse_attention(q, k_cache, v_cache, idx, cnt, q_block=1, kv_block=bs, causal=True, q_pos=q_pos,
                                   implementation=self.implementation)
        return {"q_sum": q_sum}, o
