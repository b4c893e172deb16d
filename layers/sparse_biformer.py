"""biformer: BiFormer's bi-level routing attention (BRA; Zhu et al., "BiFormer: Vision Transformer with Bi-Level
Routing Attention", CVPR 2023, arXiv 2303.08810 §3.2, Algorithm 1), in one dimension and non-causal.

The paper's three steps, with regions = blocks of `block_size` tokens (the 2-D map's S×S regions become the
sequence's blocks; a partial last block is its own region):
1. region descriptors: the mean of the region's queries and of its keys, over every channel of every head (the
   paper's `q.mean`, `k.mean` over the full width), so the routing is shared by all heads;
2. region-to-region affinity A_r = Q_r K_rᵀ (eq. 4) and, per query region, the indices of its `top_k` regions
   (eq. 5; the own region is not forced, as in the paper); the descriptors are detached (the official
   `diff_routing=False`), and the indices carry no gradient anyway;
3. token-to-token attention of every query of region I over the keys of its k routed regions (eq. 6), here
   `pallas_kernels.block_sparse.block_sparse_attention(causal=False)` with the routed regions as its lists (one
   list for all heads, so the op loads a key block once per query block), plus the local context enhancement
   LCE(V) (eq. 6: a depthwise convolution on V, kernel `biformer_lce`, the official `side_dwconv=5`; 0: none).

Choices of this 1-D adaptation:
- The descriptors average the queries and keys before RoPE (q_raw, k_raw): the routing compares content, not the
  RoPE phases of each region (the paper has no RoPE; its positions come from the convolutions). The token
  attention uses the RoPE'd q, k, as `attention` does, with the head-dim scale.
- With GQA the query descriptor is averaged over each KV head's query group before the full-width product, so the
  affinity is proportional to the sum over query heads h of q_r[h] · k_r[kv(h)] (the keys repeated per group).
- Every query region reads exactly min(top_k, nB) regions: the cost per query is top_k · block_size keys whatever
  the content, equal to `bidir_window`'s (its static counterpart in layers/sparse_attention.py) at the same top_k.
- `biformer_routing: window` replaces step 2 by position: each query region reads the top_k regions centred on it
  (`sparse_patterns.bidir_window_blocks`, as the `bidir_window` pattern), everything else (LCE included) the same:
  the control of equal cost that isolates what the content routing adds. With top_k >= nB both are dense non-causal
  attention (+ LCE).
- LCE: a 'same'-padded depthwise 1-D convolution over the tokens of each value channel (zero padding at both
  ends), added to each query head's output from its KV head's values (GQA).

Non-causal: every query region may route to any region, and a region's descriptor averages all of its tokens, so
a token's output depends on later tokens. The layer therefore neither decodes nor prefills this pattern
(`SparseAttention.causal` is False); it runs on non-causal tasks (train/data/mqar_bidir.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers import sparse_patterns, sparse_select
from effarch.pallas_kernels.block_sparse import block_sparse_attention


class BiFormerPolicy(nnx.Module):
    """The `biformer` pattern of `sparse_attention` (layers/sparse_attention.py dispatches to it).

    Attributes:
      lce_kernel: [biformer_lce, Hkv · Dv] depthwise convolution weights on V (only with biformer_lce > 0).
      lce_bias: [Hkv · Dv].
    """

    def __init__(self, config, *, n_heads: int, n_kv_heads: int, head_dim: int, rngs: nnx.Rngs):
        self.block = config.block_size
        self.top_k = config.top_k
        self.routing = config.biformer_routing
        self.implementation = config.implementation
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.lce = config.biformer_lce
        if self.lce:
            channels = n_kv_heads * head_dim
            # nn.Conv2d's default init (kaiming uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
            # the kernel size of a depthwise filter.
            bound = self.lce ** -0.5
            self.lce_kernel = nnx.Param(jax.random.uniform(rngs.params(), (self.lce, channels), jnp.float32,
                                                           -bound, bound), logical_axes=(None, "kv_heads"))
            self.lce_bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), jnp.float32, -bound, bound),
                                      logical_axes=("kv_heads",))

    def route(self, q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"]) -> tuple[
            Int[Array, "B 1 nB Kmax"], Int[Array, "B 1 nB"]]:
        """Steps 1-2: the k regions each query region reads, best first; one list for all heads (Hs = 1). With
        biformer_routing "window": the k regions centred on the query region, whatever the content."""
        B, T = q_raw.shape[:2]
        if self.routing == "window":
            nb = -(-T // self.block)
            idx, cnt = sparse_patterns.block_lists(sparse_patterns.bidir_window_blocks(nb, nb, k=self.top_k))
            return (jnp.broadcast_to(jnp.asarray(idx)[None], (B, *idx.shape)),
                    jnp.broadcast_to(jnp.asarray(cnt)[None], (B, *cnt.shape)))
        q_r = sparse_select.block_pool(q_raw, self.block).reshape(B, -1, self.n_heads * self.head_dim)
        k_r = sparse_select.block_pool(k_raw, self.block).reshape(B, -1, self.n_kv_heads * self.head_dim)
        if self.n_kv_heads != self.n_heads:  # GQA: each KV head's key descriptor meets its query group's queries
            g = self.n_heads // self.n_kv_heads
            q_r = q_r.reshape(B, -1, self.n_kv_heads, g, self.head_dim).mean(axis=3).reshape(B, q_r.shape[1], -1)
        affinity = jnp.einsum("bic,bjc->bij", jax.lax.stop_gradient(q_r), jax.lax.stop_gradient(k_r))
        n_blocks = affinity.shape[-1]
        k = min(self.top_k, n_blocks)
        _, idx = jax.lax.top_k(affinity, k)
        cnt = jnp.full(idx.shape[:2], k, jnp.int32)
        return idx[:, None].astype(jnp.int32), cnt[:, None]

    def local_context(self, v: Float[Array, "B T Hkv Dv"]) -> Float[Array, "B T Hq Dv"]:
        """LCE(V): the depthwise 'same' convolution over tokens, per value channel, repeated over each GQA group."""
        B, T, hkv, dv = v.shape
        w = self.lce
        x = jnp.pad(v.reshape(B, T, hkv * dv), ((0, 0), ((w - 1) // 2, w // 2), (0, 0)))
        kernel, bias = self.lce_kernel[...].astype(v.dtype), self.lce_bias[...].astype(v.dtype)
        out = sum(x[:, i:i + T] * kernel[i][None, None] for i in range(w)) + bias[None, None]
        return jnp.repeat(out.reshape(B, T, hkv, dv), self.n_heads // hkv, axis=2)

    def __call__(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv Dv"], *,
                 q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"],
                 positions: Int[Array, " T"]) -> Float[Array, "B T Hq Dv"]:
        """The parallel (and only) form: routed non-causal attention over all T tokens (+ LCE(V))."""
        del positions
        idx, cnt = self.route(q_raw, k_raw)
        o = block_sparse_attention(q, k, v, idx, cnt, q_block=self.block, kv_block=self.block, causal=False,
                                   implementation=self.implementation)
        if self.lce:
            o = o + self.local_context(v).astype(o.dtype)
        return o

    # A non-causal pattern has no decoding: SparseAttention raises before reaching these (its `causal` is False).
    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> dict:
        raise ValueError("sparse_attention: pattern biformer is non-causal and cannot decode")

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        raise ValueError("sparse_attention: pattern biformer is non-causal and cannot decode")

    def decode(self, state, q, k_cache, v_cache, *, q_raw, k_raw, q_pos):
        raise ValueError("sparse_attention: pattern biformer is non-causal and cannot decode")
