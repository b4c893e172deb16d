"""seer: SeerAttention's learned block gate (Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your
LLMs", arXiv 2410.13276 §3; the AttnGate of microsoft/SeerAttention, gate type Qavg_Kmaxminavg).

The gate (per layer, blocks of b = `block_size` tokens, gate width dg = `gate_dim`, default the head dim K):

    Qp[I] = avg-pool_b(q_raw)[I]                                   [B, nB, Hq, K]   (pre-RoPE queries)
    Kp[J] = concat(max-pool_b, min-pool_b, avg-pool_b)(k_raw)[J]   [B, nB, Hkv, 3K] (pre-RoPE keys)
    q̃ = Qp W_q (per query head, K -> dg) only when dg != K, else q̃ = Qp;
    k̃ = Kp W_k (3K -> dg): per query head (Kp repeated over its GQA group) when there is no W_q, else per KV head
         (then shared by the group's query heads), as the official gate does;
    q̃, k̃ rotated by RoPE of width dg at the position of the block's first token (I·b, J·b), with the model's θ
    and scaling (no rotation when the layer has no RoPE);
    S[b, h, I, J] = q̃_I · k̃_J / sqrt(dg), one score map per query head, causal J <= I.

Pooling uses ceil mode (a partial last block is pooled over its tokens); the weights start at normal(0, 0.02).

Training (`distill: true`, the paper's post-training on a frozen model): the parallel form is the dense attention
pass that also emits the target, `pallas_kernels.block_sparse.block_stats_attention` (its o is what the layer outputs,
so the model computes exactly its dense function while the gate learns), and the layer stores the distillation loss
in an AuxLoss (layers/aux_loss.py) that the trainer adds with weight train.aux_loss_weight:

    GT[I, :] = block_scores[I, :] / Σ_J block_scores[I, J]        (the block max-pooled attention map, row-normalised)
    loss = gate_loss_scale · mean_{b, h, I >= nB // 4, J} GT · (log GT − log_softmax_{J <= I}(S))

i.e. torch's KLDivLoss with its default 'mean' reduction over every element (1/nB of a per-row KL), after dropping
the first nB // 4 query blocks "for training stability", times the paper's gate_loss_scale 10. The map is under
stop_gradient, the output does not depend on the gate, and the gate reads q_raw, k_raw under stop_gradient, so
the gate learns from this loss alone and the loss trains nothing but the gate (with `train.freeze` on everything else:
"frozen model, trainable gates", the paper's setting; trained from scratch, the LM learns dense attention from its own
loss while its gate learns from the statistics of the same pass).

Inference (`distill: false`): query block I reads, per query head, the blocks the gate selects: top-k (`top_k`, or
`density` by the paper's nz_ratio rule, the same k for every row, on the raw scores) or, when `gate_threshold` τ is
set, the blocks J < I with softmax_J(S)[I, J] > τ; the diagonal block is always read (the paper does not force it, so
one of its rows could read nothing), and the first `sink_blocks` blocks too (layers/sparse_select.py). The layer's
AuxLoss stays 0.

Decoding: with `distill: true`, full causal attention over the KV cache, which equals the parallel form. Otherwise
the gate's pooled queries, like mean_topk's block means (layers/sparse_topk.py), use every query of a block, the later
ones too, so the selection is not causal at token level; decoding keeps each block's sum of pre-RoPE queries and the
pre-RoPE keys (a second cache, [B, S, Hkv, K]), and a call ending at position e selects for its tokens as the
parallel form over x[:e + 1] does, token for token (tests/layers/test_sparse_seer.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.layers import sparse_select
from effarch.layers.aux_loss import zero_aux_loss
from effarch.layers.rope import apply_rope, scaled_rope_frequencies
from effarch.pallas_kernels.block_sparse import block_sparse_attention, block_stats_attention

STATS_IMPLEMENTATIONS = ("reference", "xla")  # block_stats_attention's paths; others take its default


def distillation_loss(scores: Float[Array, "B H nQ nK"], block_scores: Float[Array, "B H nQ nK"]) -> Float[Array, ""]:
    """KL(GT ‖ softmax(S)) with torch KLDivLoss's 'mean' reduction over every element of the kept rows (the first
    nQ // 4 query blocks dropped); GT = block_scores row-normalised; S masked to J <= I."""
    nq, nk = scores.shape[-2:]
    causal = jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None]
    log_p = jax.nn.log_softmax(jnp.where(causal, scores.astype(jnp.float32), -1e9), axis=-1)
    gt = jax.lax.stop_gradient(block_scores.astype(jnp.float32))
    gt = gt / jnp.maximum(gt.sum(-1, keepdims=True), 1e-30)
    kl = jnp.where(gt > 0, gt * (jnp.log(jnp.where(gt > 0, gt, 1.0)) - log_p), 0.0)
    return kl[:, :, nq // 4:].mean()


class SeerPolicy(nnx.Module):
    """The `seer` pattern of `sparse_attention` (layers/sparse_attention.py dispatches to it).

    Attributes:
      q_gate: [Hq, K, dg] (only when dg != K); k_gate: [Hkv, 3K, dg] with q_gate, else [Hq, 3K, dg].
      distill_loss: AuxLoss, gate_loss_scale · KL of the latest parallel pass with `distill` (0 otherwise).
    """

    def __init__(self, config, *, n_heads: int, n_kv_heads: int, head_dim: int, rngs: nnx.Rngs):
        self.block = config.block_size
        self.top_k, self.density, self.sink_blocks = config.top_k, config.density, config.sink_blocks
        self.threshold, self.distill, self.loss_scale = config.gate_threshold, config.distill, config.gate_loss_scale
        self.implementation = config.implementation
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.gate_dim = dg = config.gate_dim or head_dim
        if config.rope and dg % 2:
            raise ValueError(f"sparse_attention.gate_dim={dg} must be even: the gate applies RoPE of its width")
        self.rope_config = config if config.rope else None  # the model's θ and scaling (static, like a config)

        def init(*shape):
            return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape), logical_axes=(None,) * len(shape))

        self.q_gate = init(n_heads, head_dim, dg) if dg != head_dim else None
        self.k_gate = init(n_kv_heads if self.q_gate is not None else n_heads, 3 * head_dim, dg)
        self.distill_loss = zero_aux_loss()

    # --- the gate ----------------------------------------------------------------------------------------------------

    def scores(self, q_pooled: Float[Array, "B R Hq K"], q_block_of_row: Int[Array, " R"],
               k_pooled: Float[Array, "B nK Hkv K3"]) -> Float[Array, "B Hq R nK"]:
        """S for rows of pooled queries (query blocks, or decoded tokens with their block's pooled query) at blocks
        q_block_of_row, against every key block's pooled [max | min | avg] keys."""
        B, R, Hq, _ = q_pooled.shape
        nk, Hkv = k_pooled.shape[1], k_pooled.shape[2]
        G = Hq // Hkv
        q_t = q_pooled.astype(jnp.float32)
        k_in = k_pooled.astype(jnp.float32)
        if self.q_gate is not None:
            q_t = jnp.einsum("BRHK,HKE->BRHE", q_t, self.q_gate[...])
            k_t = jnp.einsum("BJHC,HCE->BJHE", k_in, self.k_gate[...])  # per KV head
            k_t = jnp.repeat(k_t, G, axis=2)  # [B, nK, Hq, dg]: small (pooled)
        else:
            k_t = jnp.einsum("BJHC,HGCE->BJHGE", k_in, self.k_gate[...].reshape(Hkv, G, *self.k_gate.shape[1:]))
            k_t = k_t.reshape(B, nk, Hq, self.gate_dim)
        if self.rope_config is not None:
            freqs = scaled_rope_frequencies(self.gate_dim, self.rope_config)
            q_t = apply_rope(q_t, jnp.asarray(q_block_of_row, jnp.int32) * self.block, freqs=freqs)
            k_t = apply_rope(k_t, jnp.arange(nk, dtype=jnp.int32) * self.block, freqs=freqs)
        return jnp.einsum("BRHE,BJHE->BHRJ", q_t, k_t) * self.gate_dim**-0.5

    def _lists(self, scores, q_block_of_row, n_blocks_now, n_blocks_max: int):
        """Lists [B, Hq, R, Kmax] from the scores: threshold, or top-k with k for n_blocks_now blocks."""
        if self.threshold is not None:
            return sparse_select.threshold_lists(scores, q_block_of_row, self.threshold, sink_blocks=self.sink_blocks)
        table = sparse_select.k_table(n_blocks_max, top_k=self.top_k, density=self.density)
        kmax = max(int(table.max()), 1 + self.sink_blocks)
        k_now = int(table[n_blocks_now]) if isinstance(n_blocks_now, int) else jnp.asarray(table)[n_blocks_now]
        return sparse_select.topk_lists(scores, q_block_of_row, k_now, kmax=kmax, sink_blocks=self.sink_blocks)

    @staticmethod
    def pool_keys(k_raw: Float[Array, "B T Hkv K"], block: int) -> Float[Array, "B nB Hkv K3"]:
        return jnp.concatenate([sparse_select.block_pool(k_raw, block, how) for how in ("max", "min", "mean")], -1)

    # --- the parallel form -------------------------------------------------------------------------------------------

    def __call__(self, q: Float[Array, "B T Hq K"], k: Float[Array, "B T Hkv K"], v: Float[Array, "B T Hkv Dv"], *,
                 q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"],
                 positions: Int[Array, " T"]) -> Float[Array, "B T Hq Dv"]:
        """Parallel form from position 0: the distillation pass (`distill`) or the gate's sparse attention."""
        del positions
        bs = self.block
        scores = self.block_scores(q_raw, k_raw)
        if self.distill:
            impl = self.implementation if self.implementation in STATS_IMPLEMENTATIONS else None
            o, block_scores = block_stats_attention(q, k, v, q_block=bs, kv_block=bs, causal=True,
                                                    implementation=impl)
            self.distill_loss[...] = self.loss_scale * distillation_loss(scores, block_scores)
            return o
        idx, cnt = self.select(q_raw, k_raw, scores)
        return block_sparse_attention(q, k, v, idx, cnt, q_block=bs, kv_block=bs, causal=True,
                                      implementation=self.implementation)

    def block_scores(self, q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"]) -> Float[
            Array, "B Hq nB nB"]:
        """The gate's S over the call's blocks (parallel form)."""
        nb = -(-q_raw.shape[1] // self.block)
        # The gate reads the projections without sending its loss back into them: it learns, the model does not.
        q_raw, k_raw = jax.lax.stop_gradient(q_raw), jax.lax.stop_gradient(k_raw)
        return self.scores(sparse_select.block_pool(q_raw, self.block), jnp.arange(nb),
                           self.pool_keys(k_raw, self.block))

    def select(self, q_raw: Float[Array, "B T Hq K"], k_raw: Float[Array, "B T Hkv K"],
               scores: Float[Array, "B Hq nB nB"] | None = None) -> tuple[Int[Array, "B Hq nB Kmax"],
                                                                          Int[Array, "B Hq nB"]]:
        """The inference pass's lists, one per query head and query block (scores: `block_scores`, if at hand)."""
        nb = -(-q_raw.shape[1] // self.block)
        scores = self.block_scores(q_raw, k_raw) if scores is None else scores
        return self._lists(scores, jnp.arange(nb), nb, nb)

    # --- decoding over the layer's KV cache ----------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> dict:
        """{"q_sum": [B, ceil(max_len / block), Hq, K] float32 (each block's sum of pre-RoPE queries so far),
        "k_raw": [B, max_len, Hkv, K] (the pre-RoPE keys, in cache_dtype)}."""
        nb = -(-max_len // self.block)
        return {"q_sum": jnp.zeros((batch_size, nb, self.n_heads, self.head_dim), jnp.float32),
                "k_raw": jnp.zeros((batch_size, max_len, self.n_kv_heads, self.head_dim), cache_dtype)}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes per sequence of `init_state`."""
        return (-(-seq_len // self.block) * self.n_heads * self.head_dim * 4
                + seq_len * self.n_kv_heads * self.head_dim * jnp.dtype(cache_dtype).itemsize)

    def decode(self, state: dict, q: Float[Array, "B Tn Hq K"], k_cache: Float[Array, "B S Hkv K"],
               v_cache: Float[Array, "B S Hkv Dv"], *, q_raw: Float[Array, "B Tn Hq K"],
               k_raw: Float[Array, "B Tn Hkv K"], q_pos: Int[Array, " Tn"]) -> tuple[dict, Float[Array, "B Tn Hq Dv"]]:
        """New tokens at consecutive positions q_pos over the cache (module docstring)."""
        bs, S = self.block, k_cache.shape[1]
        nb = -(-S // bs)
        qb = q_pos // bs
        k_raw_cache = jax.lax.dynamic_update_slice(state["k_raw"], k_raw.astype(state["k_raw"].dtype),
                                                   (0, q_pos[0], 0, 0))
        q_sum = state["q_sum"].at[:, qb].add(q_raw.astype(jnp.float32), mode="drop")
        new_state = {"q_sum": q_sum, "k_raw": k_raw_cache}
        if self.distill:  # dense causal attention, as the parallel form's block_stats_attention
            everything = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (q.shape[0], 1, q.shape[1], nb))
            o = block_sparse_attention(q, k_cache, v_cache, everything, jnp.full(everything.shape[:3], nb, jnp.int32),
                                       q_block=1, kv_block=bs, causal=True, q_pos=q_pos,
                                       implementation=self.implementation)
            return new_state, o
        last = q_pos[-1]
        known = jnp.minimum(last + 1, (qb + 1) * bs) - qb * bs
        q_mean = q_sum[:, jnp.minimum(qb, nb - 1)] / known[None, :, None, None].astype(jnp.float32)
        scores = self.scores(q_mean, qb, self.pool_keys(k_raw_cache, bs))
        idx, cnt = self._lists(scores, qb, jnp.minimum(last // bs + 1, nb), nb)
        o = block_sparse_attention(q, k_cache, v_cache, idx, cnt, q_block=1, kv_block=bs, causal=True, q_pos=q_pos,
                                   implementation=self.implementation)
        return new_state, o
