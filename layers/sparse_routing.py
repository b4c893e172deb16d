"""Routing Transformer attention, exactly causal: the `routing` policy of the sparse_attention mixer.

Paper: Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing Transformers", TACL
2021 (arXiv 2003.05997), §4 (online k-means routing attention) and §4.1 (local and routing heads). Third-party code
read for details: lucidrains/routing-transformer (`Kmeans`, `KmeansAttention`).

Per KV head h (its query heads share the routing), C centroids μ [C, K]:

- cluster: c(t) = argmax_c μ_c · k̂_t of the token's key (k̂ = k / ‖k‖; the key attention uses, after RoPE, as
  lucidrains' layer, so decoding reads the clusters off the dense KV cache with no extra state). The query of t is
  routed by the same c(t): one layout for queries and keys.
- attention: token t sees the `block_size` newest tokens of its own cluster up to itself,
  {j ≤ t : c(j) = c(t), rank(t) − rank(j) < block_size} with rank(j) = #{i < j : c(i) = c(j)}. Computed by sorting
  the tokens by (cluster, position) and running `block_sparse_attention` on the sorted layout with q_pos = kv_pos =
  rank, segment ids = cluster, window = block_size and lists {I − 1, I} (blocks of block_size: the window never
  reaches past the previous block). The visible set depends only on tokens ≤ t, so the layer is causal; the paper's
  balanced top-w clusters are not (which keys share a cluster depends on later tokens' similarities).
- local heads: the last `routing_local_heads` KV heads put every token in one cluster, which makes the same window a
  causal sliding window of block_size tokens (the paper mixes local and routing heads, §4.1; lucidrains'
  `n_local_attn_heads`). Their local window equals the routing window, so every head costs the same.
- centroids: a `Centroids` TrainedBuffer (layers/trained_state.py), never a parameter. Initialised to random unit
  vectors (seeded by the layer's params stream; lucidrains runs 10 k-means iterations on the first batch instead).
  In training mode (`use_running_average=False`, which the trainer sets) each parallel pass writes the EMA
  μ ← decay·μ + (1 − decay)·μ_batch, μ_batch[c] = the normalised sum of the k̂ assigned to c (μ where no token was),
  over the batch's tokens; μ is not renormalised after the update (lucidrains' `ema_inplace`). The trainer averages
  the written values over micro-batches, i.e. μ_batch is averaged over the forward passes of a step, as lucidrains.
- commitment loss: routing_commitment · mean ‖k̂ − sg(μ_c(t))‖² / K (the MSE of lucidrains' `Kmeans`, gradient to
  the keys only), written to an AuxLoss (layers/aux_loss.py) on every parallel pass; the trainer adds
  train.aux_loss_weight (β) times it. The paper's weight 1e-4 is β · routing_commitment = 0.01 · 0.01.

Decoding over Attention's KV cache (`decode`) recomputes the clusters and ranks of the cached keys and applies the
same predicates with one query block per token, so it equals the parallel form token for token.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int, Shaped

from effarch.layers.aux_loss import zero_aux_loss
from effarch.layers.trained_state import TrainedBuffer
from effarch.pallas_kernels.block_sparse import block_sparse_attention


class Centroids(TrainedBuffer):
    """k-means centroids [H_routed, C, K] of the routing KV heads (float32, no gradient)."""


def _unit(x: Float[Array, "... K"]) -> Float[Array, "... K"]:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def ema_centroids(mu: Float[Array, "H C K"], k_unit: Float[Array, "B T H K"], cluster: Int[Array, "B T H"],
                  decay: float) -> Float[Array, "H C K"]:
    """One online spherical k-means step: decay·μ + (1 − decay)·μ_batch, μ_batch[h, c] = normalised Σ of the unit
    keys assigned to c (μ[h, c] where none was)."""
    onehot = jax.nn.one_hot(cluster, mu.shape[1], dtype=jnp.float32)  # [B, T, H, C]
    sums = jnp.einsum("bthc,bthk->hck", onehot, k_unit.astype(jnp.float32))
    counts = onehot.sum((0, 1))
    batch = jnp.where(counts[..., None] > 0, _unit(sums), mu)
    return decay * mu + (1.0 - decay) * batch


def cluster_ranks(cluster: Int[Array, "B T H"], n_clusters: int) -> Int[Array, "B T H"]:
    """rank(t) = #{i < t : c(i) = c(t)} along T."""
    onehot = jax.nn.one_hot(cluster, n_clusters, dtype=jnp.int32)
    before = jnp.cumsum(onehot, axis=1) - onehot
    return jnp.take_along_axis(before, cluster[..., None], axis=-1)[..., 0]


class RoutingPolicy(nnx.Module):
    """Causal routing attention (module docstring) for q [B, T, Hq, K], k [B, T, Hkv, K], v [B, T, Hkv, Dv].

    Attributes:
      centroids: Centroids [Hkv − routing_local_heads, C, K].
      commitment: AuxLoss, routing_commitment times the commitment MSE of the latest parallel pass.
      use_running_average: True (default): the forward pass reads the centroids; False (`model.train()`): it also
        writes their EMA update.
    """

    def __init__(self, config, *, n_heads: int, n_kv_heads: int, head_dim: int, rngs: nnx.Rngs):
        self.block = config.block_size
        self.n_clusters = config.routing_clusters
        self.n_local = config.routing_local_heads
        self.decay = config.routing_decay
        self.weight = config.routing_commitment
        self.implementation = config.implementation
        self.n_kv_heads = n_kv_heads
        n_routed = n_kv_heads - self.n_local
        if n_routed < 0:
            raise ValueError(f"sparse_attention.routing_local_heads={self.n_local} must be <= kv heads {n_kv_heads}")
        mu = jax.random.normal(rngs.params(), (n_routed, self.n_clusters, head_dim), jnp.float32)
        self.centroids = Centroids(_unit(mu))
        self.commitment = zero_aux_loss()
        self.use_running_average = True

    # --- routing ---------------------------------------------------------------------------------------------------

    def clusters(self, k: Float[Array, "B S Hkv K"]) -> Int[Array, "B S Hkv"]:
        """c(t) per KV head: the nearest centroid of the key (argmax μ·k, the same as of k̂); local heads 0."""
        mu = jax.lax.stop_gradient(self.centroids[...])
        routed = k[:, :, : mu.shape[0]].astype(jnp.float32)
        c = jnp.argmax(jnp.einsum("bshk,hck->bshc", routed, mu), axis=-1).astype(jnp.int32)
        local = jnp.zeros((*k.shape[:2], self.n_local), jnp.int32)
        return jnp.concatenate([c, local], axis=2)

    def _train_centroids(self, k: Float[Array, "B T Hkv K"], cluster: Int[Array, "B T Hkv"]) -> None:
        """Writes the commitment loss, and in training mode the centroids' EMA update."""
        mu = jax.lax.stop_gradient(self.centroids[...])
        n_routed = mu.shape[0]
        if n_routed == 0:
            return
        k_unit = _unit(k[:, :, :n_routed].astype(jnp.float32))
        c = cluster[:, :, :n_routed]
        nearest = mu[jnp.arange(n_routed)[None, None, :], c]  # [B, T, Hr, K]
        self.commitment[...] = self.weight * jnp.mean(jnp.square(k_unit - nearest))
        if not self.use_running_average:
            self.centroids[...] = jax.lax.stop_gradient(ema_centroids(mu, k_unit, c, self.decay))

    def _fold(self, x: Shaped[Array, "B T Hkv G D"]) -> Shaped[Array, "BH T G D"]:
        """[B, T, Hkv, G, D] -> [B·Hkv, T, G, D]: one batch row per KV head (each has its own layout)."""
        B, T, Hkv = x.shape[:3]
        return jnp.moveaxis(x, 2, 1).reshape(B * Hkv, T, *x.shape[3:])

    def __call__(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv Dv"], *,
                 q_raw=None, k_raw=None, positions=None) -> Float[Array, "B T Hq Dv"]:
        """Parallel (training) form. q_raw, k_raw, positions: unused (routing reads the keys attention uses)."""
        del q_raw, k_raw, positions
        B, T, Hq, K = q.shape
        Hkv, Dv, bs = k.shape[2], v.shape[-1], self.block
        G = Hq // Hkv
        cluster = self.clusters(k)
        self._train_centroids(k, cluster)

        # Sorted layout per (b, h): by cluster, then position (the sort key is unique, so the order is too).
        order = jnp.argsort(cluster * T + jnp.arange(T, dtype=jnp.int32)[None, :, None], axis=1)  # [B, T, Hkv]
        c_sorted = jnp.take_along_axis(cluster, order, axis=1)
        rank_sorted = jnp.take_along_axis(cluster_ranks(cluster, self.n_clusters), order, axis=1)

        def gather(x):  # [B, T, Hkv, G, D] in sorted order, folded to [B·Hkv, T, G, D]
            return self._fold(jnp.take_along_axis(x, order[..., None, None], axis=1))

        q_s = gather(q.reshape(B, T, Hkv, G, K))
        k_s, v_s = gather(k[:, :, :, None]), gather(v[:, :, :, None])
        pos = self._fold(rank_sorted[..., None, None])[..., 0, 0]  # [B·Hkv, T]
        seg = self._fold(c_sorted[..., None, None])[..., 0, 0]
        idx, cnt = self.lists(-(-T // bs), B * Hkv)
        o_s = block_sparse_attention(q_s, k_s, v_s, idx, cnt, q_block=bs, kv_block=bs, causal=True, window=bs,
                                     q_pos=pos, kv_pos=pos, segment_ids=seg, implementation=self.implementation)
        o_s = jnp.moveaxis(o_s.reshape(B, Hkv, T, G, Dv), 1, 2)  # [B, T(sorted), Hkv, G, Dv]
        inverse = jnp.argsort(order, axis=1)
        o = jnp.take_along_axis(o_s, inverse[..., None, None], axis=1)
        return o.reshape(B, T, Hq, Dv)

    @staticmethod
    def lists(n_blocks: int, batch: int) -> tuple[Int[Array, "B 1 nQb 2"], Int[Array, "B 1 nQb"]]:
        """Lists {I, I − 1} of the sorted layout (just {0} for the first block), shared by every row."""
        blocks = np.arange(n_blocks)
        idx = np.stack([blocks, np.where(blocks > 0, blocks - 1, -1)], axis=-1).astype(np.int32)
        cnt = np.where(blocks > 0, 2, 1).astype(np.int32)
        return (jnp.broadcast_to(jnp.asarray(idx), (batch, 1, n_blocks, 2)),
                jnp.broadcast_to(jnp.asarray(cnt), (batch, 1, n_blocks)))

    # --- decoding --------------------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> dict:
        """No state of its own: the clusters and ranks are recomputed from the KV cache's keys."""
        return {}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        return 0

    def decode(self, state: dict, q: Float[Array, "B Tn Hq K"], k_cache: Float[Array, "B S Hkv K"],
               v_cache: Float[Array, "B S Hkv Dv"], *, q_pos, q_raw=None, k_raw=None
               ) -> tuple[dict, Float[Array, "B Tn Hq Dv"]]:
        """New queries at positions q_pos ([Tn] or [B, Tn]; their keys already written at slot = position) over the
        dense KV cache. Clusters and ranks of every slot are recomputed from the cached keys; a slot past the query
        has a larger rank in its cluster (ranks count earlier slots only), so the causal predicate on ranks hides it
        and the unwritten slots need no mask. Equals the parallel form (same predicates), one query block per
        token, every key block listed. Returns (state, o)."""
        del q_raw, k_raw
        B, Tn, Hq, K = q.shape
        S, Hkv, Dv, bs = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1], self.block
        G = Hq // Hkv
        cluster = self.clusters(k_cache)  # [B, S, Hkv]
        rank = cluster_ranks(cluster, self.n_clusters)
        slots = jnp.clip(jnp.broadcast_to(jnp.asarray(q_pos, jnp.int32), (B, Tn)), 0, S - 1)
        q_cluster = jnp.take_along_axis(cluster, slots[..., None], axis=1)  # [B, Tn, Hkv]
        q_rank = jnp.take_along_axis(rank, slots[..., None], axis=1)

        def fold_ids(x):  # [B, L, Hkv] -> [B·Hkv, L]
            return jnp.moveaxis(x, 2, 1).reshape(B * Hkv, -1)

        n_kv_blocks = -(-S // bs)
        idx = jnp.broadcast_to(jnp.arange(n_kv_blocks, dtype=jnp.int32), (B * Hkv, 1, Tn, n_kv_blocks))
        cnt = jnp.full((B * Hkv, 1, Tn), n_kv_blocks, jnp.int32)
        o = block_sparse_attention(
            self._fold(q.reshape(B, Tn, Hkv, G, K)), self._fold(k_cache[:, :, :, None]).astype(q.dtype),
            self._fold(v_cache[:, :, :, None]).astype(q.dtype), idx, cnt, q_block=1, kv_block=bs, causal=True,
            window=bs, q_pos=fold_ids(q_rank), kv_pos=fold_ids(rank),
            segment_ids=(fold_ids(q_cluster), fold_ids(cluster)), implementation=self.implementation)
        return state, jnp.moveaxis(o.reshape(B, Hkv, Tn, G, Dv), 1, 2).reshape(B, Tn, Hq, Dv)
