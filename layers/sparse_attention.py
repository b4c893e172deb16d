"""Block-sparse softmax attention with static per-head patterns: sink + window, S2-Attention, LongLoRA's S²-Attn,
MoA's elastic spans, a non-causal block window; and with content-selected (dynamic) patterns.

The projections, RoPE, GQA grouping and the dense KV cache are those of `layers/attention.py` (this layer subclasses
`Attention`, so a trained `attention` layer's weights fit it as they are: `arches/convert_sparse_attention.py`); the
core is `pallas_kernels.block_sparse.block_sparse_attention` with lists that `layers/sparse_patterns.py` builds once,
in numpy, at trace time. `pattern` picks them:

- "sink_window" (StreamingLLM, Xiao et al., arXiv 2309.17453 §3.2): query t sees the first `n_sink` tokens and the
  causal window t - window < j <= t (the op's window / n_sink predicates; the lists hold the sink blocks and the
  blocks the window reaches). Decoding keeps a bounded cache: the n_sink sink keys plus a ring buffer of `window`
  slots (slot p % window, the convention of pallas_kernels/sliding_window/cache.py), so memory and time per token do
  not grow with the context. RoPE is applied at true positions, except with `sink_positions: cache`: then a query
  scores the sink keys from its position within the cache, min(t, n_sink + window - 1), as StreamingLLM numbers
  its cache (§3.2), so past the training length the query-to-sink distance stays one seen in training (the window
  keys' distances are the true ones either way); the window part and the sink part are merged by their LSE.
- "s2" (S2-Attention, Lin et al., arXiv 2407.17678 §3; dkernel's local-stride pattern): each KV head reads the
  `local_blocks` newest blocks plus the blocks J with (J + h·s) mod vert_stride = 0, a different residue per head,
  so the heads together cover the context; the last `dense_heads` KV heads read every causal block. The paper's
  hybrid (sparse and dense layers alternating) is a `model.mixers` list, e.g. [sparse_attention, attention].
- "longlora" (LongLoRA, Chen et al., arXiv 2309.12307 §3.2): groups of `group_size` tokens; the second half of the
  heads uses groups shifted by group_size / 2, written as block-diagonal lists, so unlike the paper's token roll no
  query sees the other end of the sequence. The paper fine-tunes with it and infers with full attention:
  `infer_dense: true`.
- "moa" (MoA, Fu et al., arXiv 2406.14909): KV head h (its query heads share it) sees a span of
  S_h(N) = α_h + β_h·N tokens for a sequence of N tokens: the first min(n_sink, S_h - 1) tokens (sinks) and the
  causal window of the rest (`sparse_patterns.moa_spans`: token-exact, through the op's per-group window and sink
  predicates). (α_h, β_h) per layer and KV head come from the JSON plan file `plan` (layers/moa_plan.py; written by
  `effarch moa-search`), read once when the layer is built. N is the length of the call in the parallel form, and
  the KV cache's length (`init_state`'s max_len: the prompt plus the new tokens, as MoA sizes its cache) when
  decoding, so a decode into a cache of T slots equals the parallel form over T tokens.

Dynamic patterns (DYNAMIC_PATTERNS) choose the key blocks from the content at every call; each is a policy module in
its own file, built as `self.policy` (its trainable parameters, if any, live under `...mixer.policy...`):

- "mean_topk" (layers/sparse_topk.py): MoBA's training-free gate, mean query of a block against the mean key of each
  earlier block, top-k (arXiv 2502.13189 §2.2).
- "seer" (layers/sparse_seer.py): SeerAttention's learned AttnGate (arXiv 2410.13276 §3), distilled from the block
  max-pooled attention map of a dense pass (`distill: true`), then selecting by top-k, density or threshold.
- "routing" (layers/sparse_routing.py): the Routing Transformer's online k-means (arXiv 2003.05997 §4), exactly
  causal: token t sees the block_size newest tokens of its key's cluster; centroids are a trained buffer updated by
  EMA in training (layers/trained_state.py); the last `routing_local_heads` KV heads are local window heads.
- "hyper" (layers/sparse_hyper.py): HyperAttention (arXiv 2310.05869), sortLSH block-diagonal attention plus sampled
  residual columns, causal by the paper's recursive halving; an approximation that decodes with exact attention.
- "hip" (layers/sparse_hip.py): HiP attention's training-free hierarchical top-k pruning (arXiv 2406.09827 §3): the
  earlier blocks cut into branches, each halved and scored by its centre key against a row of `hip_query_block`
  queries, the best halves kept, until one block each; O(T log T) selection. Rows of one query are exactly causal.
- "biformer" (layers/sparse_biformer.py): BiFormer's bi-level routing attention (arXiv 2303.08810 §3.2), non-causal:
  each query region (block) attends to the `top_k` regions whose mean key best matches its mean query, plus the
  optional LCE (a depthwise convolution on V, `biformer_lce`).

Non-causal patterns (NONCAUSAL_PATTERNS: "biformer" and the static "bidir_window", the `top_k` blocks centred on the
query block, biformer's window of equal cost: `sparse_patterns.bidir_window_blocks`) let every query read keys on
both sides: the op runs with causal=False, the layer's `causal` property is False, and init_state / prefill /
decode_step / state_size raise a one-line error (a non-causal mixer cannot decode). They train on non-causal tasks
(`data.task: mqar_bidir`, train/data/mqar_bidir.py).

The policy protocol (the layer calls nothing else):
  `Policy(config, *, n_heads, n_kv_heads, head_dim, rngs)`;
  `policy(q, k, v, *, q_raw, k_raw, positions) -> o [B, T, Hq, Dv]`: the parallel form from position 0; q [B, T, Hq,
  K], k [B, T, Hkv, K] after RoPE (what attention uses), q_raw / k_raw before it, positions int32 [T];
  `policy.init_state(batch_size, max_len, cache_dtype) -> dict` and `policy.state_size(seq_len, cache_dtype) -> int`:
  the policy's own decode state (under the state's "policy" key, next to Attention's KV cache) and its bytes per
  sequence;
  `policy.decode(state, q, k_cache, v_cache, *, q_raw, k_raw, q_pos) -> (state, o)`: the new tokens (q, q_raw
  [B, Tn, Hq, K], k_raw [B, Tn, Hkv, K], at consecutive positions q_pos int32 [Tn]) over the KV cache, which already
  holds their k and v (slots past q_pos[-1] are not yet written).

Decoding (prefill / decode_step) equals the parallel form for every causal static pattern, except with `infer_dense`,
where it is `Attention`'s full causal attention on the same weights (then the parallel form is still the sparse
training form). A dynamic policy's docstring says how its decoding relates to its parallel form.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from effarch.layers import moa_plan, sparse_patterns
from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.axes import Hidden, HiddenStep, State
from effarch.layers.rope import ROPE_SCALING_FIELDS, apply_rope
from effarch.layers.sparse_biformer import BiFormerPolicy
from effarch.layers.sparse_hip import HipPolicy
from effarch.layers.sparse_hyper import HyperPolicy
from effarch.layers.sparse_routing import RoutingPolicy
from effarch.layers.sparse_seer import SeerPolicy
from effarch.layers.sparse_topk import MeanTopkPolicy
from effarch.pallas_kernels import sliding_window as swa_op
from effarch.pallas_kernels.block_sparse import block_sparse_attention, merge_attention
from effarch.pallas_kernels.block_sparse.reference import masked_softmax

# The patterns whose blocks a policy module chooses from the content, and each one's policy class (module docstring).
DYNAMIC_PATTERNS = ("mean_topk", "seer", "routing", "hyper", "hip", "biformer")
PATTERNS = ("sink_window", "s2", "longlora", "moa", "bidir_window", *DYNAMIC_PATTERNS)
POLICIES = {"mean_topk": MeanTopkPolicy, "seer": SeerPolicy, "routing": RoutingPolicy, "hyper": HyperPolicy,
            "hip": HipPolicy, "biformer": BiFormerPolicy}
# The non-causal patterns: every query reads keys on both sides; the layer neither decodes nor prefills them.
NONCAUSAL_PATTERNS = ("bidir_window", "biformer")


@dataclasses.dataclass(frozen=True, slots=True)
class SparseAttentionConfig:
    pattern: Literal["sink_window", "s2", "longlora", "moa", "bidir_window", "mean_topk", "seer", "routing", "hyper",
                     "hip", "biformer"] = "sink_window"
    block_size: int = 64  # q_block = kv_block of the op, tokens
    # sink_window (StreamingLLM's start_size 4; its recent_size is window - 1: the query's own key is in the window)
    n_sink: int = 4  # attention-sink tokens at the start of the sequence (sink_window; moa: per head at most S_h - 1)
    window: int = 1024  # keys in the causal window, t - window < j <= t
    # sink_window: where a query stands when it scores the sink keys. "text": at its own position t in the text (as
    # for every other key). "cache": at its position within StreamingLLM's cache of n_sink + window keys,
    # min(t, n_sink + window - 1) (arXiv 2309.17453 §3.2), so the query-to-sink distance never exceeds the cache.
    sink_positions: Literal["text", "cache"] = "text"
    # s2 (Phi-3-small: blocks of 64, 16 local blocks, vertical stride 8)
    local_blocks: int = 16  # newest blocks every head reads, the diagonal block included
    vert_stride: int = 8  # V: a sparse head reads one earlier block in V
    dense_heads: int = 0  # the last dense_heads KV heads read every causal block
    # longlora (the paper: a quarter of the fine-tuning length)
    group_size: int = 2048  # G tokens per attention group; even, with block_size dividing G / 2
    # moa: the plan file (JSON, layers/moa_plan.py) with (alpha, beta) per layer and KV head
    plan: str | None = None
    # dynamic patterns' block selection (mean_topk, seer, hip; layers/sparse_select.py): each query block reads k
    # blocks, its own (diagonal) block and the sink blocks included; k = top_k, or from density when it is set.
    # biformer: the regions each query region routes to; bidir_window: the blocks of its window (both: exactly top_k)
    top_k: int = 3  # MoBA's top-k (its current block included)
    density: float | None = None  # r in (0, 1]: k = max(1, int((1 - sqrt(1 - r)) nB)) (SeerAttention's nz_ratio)
    sink_blocks: int = 0  # the first blocks every query block reads
    # mean_topk: how a GQA group's query heads share one list: "max" (a block any head wants) or "mean" of scores
    score_reduce: Literal["max", "mean"] = "max"
    # seer (SeerAttention's AttnGate, layers/sparse_seer.py; the official run's values)
    gate_dim: int | None = None  # dg, the gate's width; None = the head dim (then the gate has no query linear)
    distill: bool = False  # true: the parallel form is the dense distillation pass (output dense, gate loss stored)
    gate_loss_scale: float = 10.0  # the stored gate loss is this times the KL (the trainer adds aux_loss_weight x it)
    gate_threshold: float | None = None  # τ: read the blocks with softmax(gate) > τ instead of top-k / density
    # routing (layers/sparse_routing.py): token t sees the block_size newest tokens of its key's k-means cluster
    routing_clusters: int = 8  # C centroids per routing KV head (lucidrains: max_seq_len / window)
    routing_local_heads: int = 0  # the last KV heads attend the causal window of block_size tokens instead
    routing_decay: float = 0.999  # EMA decay of the centroids (training mode), the paper's and lucidrains'
    # scales the commitment MSE in its AuxLoss; times train.aux_loss_weight (0.01) it is lucidrains' weight 1e-4
    routing_commitment: float = 0.01
    # hyper (layers/sparse_hyper.py): sortLSH blocks of block_size keys (official 256) plus sampled key columns
    hyper_lsh_bits: int = 7  # sign bits of the LSH (official lsh_num_projs 7)
    hyper_samples: int = 64  # m uniformly sampled key columns of the residual (official 256; 0: none)
    hyper_min_seq_len: int = 256  # exact causal attention at n <= this (official 4096, past any CPU-scale length)
    hyper_seed: int = 0  # seeds the LSH directions and the samples
    # hip (layers/sparse_hip.py): HiP's hierarchical search keeps top_k (or density's k) blocks per query block;
    # the key that stands for a half-branch: its "center" token (the paper's, arXiv 2406.09827 §3) or its "first"
    hip_representative: Literal["center", "first"] = "center"
    # b_q: the queries that share one list (a divisor of block_size; None = block_size). 1: a list per token, exactly
    # causal (a shared list is chosen with the row's later queries too: layers/sparse_hip.py)
    hip_query_block: int | None = None
    # biformer (layers/sparse_biformer.py; regions = blocks of block_size tokens, top_k regions per query region)
    biformer_lce: int = 0  # LCE: kernel of the depthwise conv on V added to the output (odd; official 5; 0: none)
    # "content": the paper's routing; "window": the top_k regions centred on the query region (the equal-cost control)
    biformer_routing: Literal["content", "window"] = "content"
    infer_dense: bool = False  # decode with full causal attention (LongLoRA's inference), any causal pattern
    # the attention layer's fields (AttentionConfig), so that a trained attention run's weights fit
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    implementation: str | None = None  # block_sparse_attention path; None = the platform default

    def __post_init__(self):
        p = "sparse_attention."
        if self.pattern not in PATTERNS:
            raise ValueError(f"{p}pattern must be one of {list(PATTERNS)}, got {self.pattern!r}")
        for name in ("block_size", "window", "local_blocks", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{p}{name} must be positive, got {getattr(self, name)}")
        if self.top_k < 1:
            raise ValueError(f"{p}top_k must be positive, got {self.top_k}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"{p}density must be in (0, 1], got {self.density}")
        if self.sink_blocks < 0:
            raise ValueError(f"{p}sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.score_reduce not in ("max", "mean"):
            raise ValueError(f"{p}score_reduce must be 'max' or 'mean', got {self.score_reduce!r}")
        if self.gate_dim is not None and self.gate_dim < 1:
            raise ValueError(f"{p}gate_dim must be positive, got {self.gate_dim}")
        if self.gate_loss_scale < 0:
            raise ValueError(f"{p}gate_loss_scale must be >= 0, got {self.gate_loss_scale}")
        if self.gate_threshold is not None and not 0 <= self.gate_threshold < 1:
            raise ValueError(f"{p}gate_threshold must be in [0, 1), got {self.gate_threshold}")
        if self.n_sink < 0:
            raise ValueError(f"{p}n_sink must be >= 0, got {self.n_sink}")
        if self.sink_positions not in ("text", "cache"):
            raise ValueError(f"{p}sink_positions must be 'text' or 'cache', got {self.sink_positions!r}")
        if self.sink_positions == "cache" and self.pattern != "sink_window":
            raise ValueError(f"{p}sink_positions='cache' applies to pattern sink_window, not {self.pattern}")
        if self.routing_clusters < 1:
            raise ValueError(f"{p}routing_clusters must be positive, got {self.routing_clusters}")
        if not 0 <= self.routing_decay < 1:
            raise ValueError(f"{p}routing_decay must be in [0, 1), got {self.routing_decay}")
        if self.routing_commitment < 0:
            raise ValueError(f"{p}routing_commitment must be >= 0, got {self.routing_commitment}")
        if not 1 <= self.hyper_lsh_bits <= 16:
            raise ValueError(f"{p}hyper_lsh_bits must be in [1, 16], got {self.hyper_lsh_bits}")
        if self.hyper_samples < 0:
            raise ValueError(f"{p}hyper_samples must be >= 0, got {self.hyper_samples}")
        if self.hyper_min_seq_len < 1:
            raise ValueError(f"{p}hyper_min_seq_len must be positive, got {self.hyper_min_seq_len}")
        if self.hip_representative not in ("center", "first"):
            raise ValueError(f"{p}hip_representative must be 'center' or 'first', got {self.hip_representative!r}")
        if self.hip_query_block is not None and (self.hip_query_block < 1 or self.block_size % self.hip_query_block):
            raise ValueError(f"{p}hip_query_block={self.hip_query_block} must be a positive divisor of "
                             f"block_size={self.block_size}")
        if self.biformer_lce < 0 or (self.biformer_lce and self.biformer_lce % 2 == 0):
            raise ValueError(f"{p}biformer_lce must be 0 (no LCE) or an odd kernel size, got {self.biformer_lce}")
        if self.biformer_lce and self.pattern != "biformer":
            raise ValueError(f"{p}biformer_lce applies to pattern biformer, not {self.pattern}")
        if self.biformer_routing not in ("content", "window"):
            raise ValueError(f"{p}biformer_routing must be 'content' or 'window', got {self.biformer_routing!r}")
        if self.biformer_routing != "content" and self.pattern != "biformer":
            raise ValueError(f"{p}biformer_routing applies to pattern biformer, not {self.pattern}")
        if self.pattern in NONCAUSAL_PATTERNS:
            if self.density is not None or self.sink_blocks:
                raise ValueError(f"{p}pattern {self.pattern} reads exactly top_k blocks; density and sink_blocks "
                                 "apply to mean_topk and seer")
            if self.infer_dense:
                raise ValueError(f"{p}infer_dense: pattern {self.pattern} is non-causal and cannot decode")
        if self.vert_stride < 2:
            raise ValueError(f"{p}vert_stride must be >= 2 (1 would read every block: use attention), "
                             f"got {self.vert_stride}")
        try:
            att = self.attention_config()
        except ValueError as e:
            raise ValueError(str(e).replace("attention.", p, 1)) from None
        if not 0 <= self.routing_local_heads <= att.kv_heads:
            raise ValueError(f"{p}routing_local_heads={self.routing_local_heads} must be in [0, kv heads="
                             f"{att.kv_heads}]")
        if not 0 <= self.dense_heads <= att.kv_heads:
            raise ValueError(f"{p}dense_heads={self.dense_heads} must be in [0, kv heads={att.kv_heads}]")
        if self.pattern == "moa" and not self.plan:
            raise ValueError(f"{p}plan: pattern moa needs a plan file (write one with effarch moa-search)")
        if self.pattern == "longlora":
            if self.group_size % 2 or (self.group_size // 2) % self.block_size:
                raise ValueError(f"{p}group_size={self.group_size} must be even and block_size={self.block_size} "
                                 f"must divide group_size / 2")
            if self.n_heads % 2:
                raise ValueError(f"{p}n_heads={self.n_heads} must be even for longlora (two halves of the heads)")

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                               rope=self.rope, rope_theta=self.rope_theta, causal=True,
                               implementation=None, **{f: getattr(self, f) for f in ROPE_SCALING_FIELDS})


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SparseAttention(Attention):
    """Self-attention mixer (layers/axes.py Mixer) over a block-sparse pattern: causal, or non-causal without decoding
    for NONCAUSAL_PATTERNS.

    Attributes:
      q_proj, k_proj, v_proj, o_proj: as Attention (same shapes and paths).
    """

    def __init__(self, d_model: int, config: SparseAttentionConfig, *, rngs: nnx.Rngs, layer_idx: int = 0,
                 n_layers: int | None = None):
        """layer_idx, n_layers: the layer's place in the model, which picks its entry of a moa plan (n_layers None:
        the plan's layer count is not checked)."""
        try:
            super().__init__(d_model, config.attention_config(), rngs=rngs)
        except ValueError as e:  # Attention's errors name its own keys; the user wrote model.sparse_attention.*
            raise ValueError(str(e).replace("attention.", "sparse_attention.", 1)
                             .replace("attention:", "sparse_attention:", 1)) from None
        self.sparse = config
        # A dynamic pattern's policy module (its parameters under `policy`); None for a static pattern.
        self.policy = (POLICIES[config.pattern](config, n_heads=self.config.n_heads, n_kv_heads=self.config.kv_heads,
                                                head_dim=self.head_dim, rngs=rngs)
                       if config.pattern in DYNAMIC_PATTERNS else None)
        self.moa_alpha = self.moa_beta = None  # moa: (α, β) per KV head, plain floats (static, like the config)
        if config.pattern == "moa":
            try:
                plan = moa_plan.read_plan(config.plan)
                self.moa_alpha, self.moa_beta = moa_plan.layer_rule(
                    plan, config.plan, layer_idx=layer_idx, n_layers=n_layers, n_kv_heads=self.config.kv_heads)
            except moa_plan.PlanError as e:
                raise ValueError(f"sparse_attention.plan: {e}") from None

    # --- the pattern -----------------------------------------------------------------------------------------------

    def moa_spans(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """moa: (span, window, sink) per KV head, int [Hkv] each, at sequence length N = n_tokens
        (`sparse_patterns.moa_spans`)."""
        return sparse_patterns.moa_spans(self.moa_alpha, self.moa_beta, n_tokens, self.sparse.n_sink)

    def block_mask(self, n_q_blocks: int, n_kv_blocks: int, seq_len: int | None = None) -> np.ndarray:
        """The pattern's block mask [Hs, nQb, nKb] (numpy) for query / key blocks of block_size tokens at 0, 1, ...;
        seq_len is moa's N (default n_kv_blocks * block_size). Static patterns only."""
        c, att = self.sparse, self.config
        if self.policy is not None:
            raise ValueError(f"sparse_attention: pattern {c.pattern} chooses its blocks from the content; "
                             "it has no static block mask")
        if c.pattern == "moa":
            _, window, sink = self.moa_spans(n_kv_blocks * c.block_size if seq_len is None else seq_len)
            return sparse_patterns.moa_blocks(n_q_blocks, n_kv_blocks, block=c.block_size, window=window,
                                              n_sink=sink)
        if c.pattern == "sink_window":
            return sparse_patterns.sink_window_blocks(n_q_blocks, n_kv_blocks, block=c.block_size, n_sink=c.n_sink,
                                                      window=c.window)
        if c.pattern == "bidir_window":
            return sparse_patterns.bidir_window_blocks(n_q_blocks, n_kv_blocks, k=c.top_k)
        if c.pattern == "s2":
            return sparse_patterns.s2_blocks(n_q_blocks, n_kv_blocks, n_kv_heads=att.kv_heads, n_q_heads=att.n_heads,
                                             local_blocks=c.local_blocks, vert_stride=c.vert_stride,
                                             dense_heads=c.dense_heads)
        # One list per KV head when the KV heads split into the two halves of the query heads, else per query head.
        n_groups = att.kv_heads if att.kv_heads % 2 == 0 else att.n_heads
        return sparse_patterns.longlora_blocks(n_q_blocks, n_kv_blocks, block=c.block_size, group_size=c.group_size,
                                               n_groups=n_groups)

    def _predicates(self, seq_len: int | None) -> dict:
        """The op's window / sink predicates at sequence length seq_len (moa's N; unused by the other patterns)."""
        c = self.sparse
        if c.pattern == "sink_window":
            return dict(window=c.window, n_sink=c.n_sink)
        if c.pattern == "moa":  # one window and sink count per list group (Hs = Hkv)
            _, window, sink = self.moa_spans(seq_len)
            return dict(window=tuple(int(w) for w in window), n_sink=tuple(int(s) for s in sink))
        return {}

    def _attend_lists(self, q, k, v, idx, cnt, *, q_block: int, seq_len: int | None = None, q_pos=None,
                      kv_pos=None, window_only: bool = False):
        """The op with per-group lists idx [Hs, nQb, Kmax], cnt [Hs, nQb] shared by the batch; seq_len: moa's N.
        window_only (sink_window): the window predicate without the sinks, returning (o, lse) for the sink part to
        be merged in (`_sink_part`)."""
        B = q.shape[0]
        idx = jnp.broadcast_to(jnp.asarray(idx, jnp.int32)[None], (B, *np.shape(idx)))
        cnt = jnp.broadcast_to(jnp.asarray(cnt, jnp.int32)[None], (B, *np.shape(cnt)))
        predicates = self._predicates(seq_len)
        if window_only:
            predicates["n_sink"] = 0
        return block_sparse_attention(q, k, v, idx, cnt, q_block=q_block, kv_block=self.sparse.block_size,
                                      causal=self.causal, q_pos=q_pos, kv_pos=kv_pos, return_lse=window_only,
                                      implementation=self.sparse.implementation, **predicates)

    # --- sink_window with StreamingLLM's cache positions (sink_positions="cache") ------------------------------------

    @property
    def cache_sinks(self) -> bool:
        """Whether sink keys are scored from the query's cache position (sink_window, sink_positions="cache")."""
        c = self.sparse
        return c.pattern == "sink_window" and c.sink_positions == "cache" and c.n_sink > 0

    def _sink_part(self, q_raw: Float[Array, "B T H K"], positions, sink_k: Float[Array, "B S Hkv K"],
                   sink_v: Float[Array, "B S Hkv Dv"], sink_valid) -> tuple[Float[Array, "B T H Dv"],
                                                                             Float[Array, "B T H"]]:
        """(o, lse) of queries at `positions` [T] over the sink keys j < S = n_sink that lie outside their window
        (j <= t - window; the window part reads the others), sink_valid bool [S]. StreamingLLM (§3.2) numbers the
        cache [sinks | window] 0, 1, ...: the query stands at min(t, n_sink + window - 1) and sink j at j, so the
        query is rotated at that position; the sink keys keep their rotation at their true positions 0..S-1. Rows
        with no such sink give o = 0, lse = -inf (merge_attention takes them), with finite gradients."""
        c = self.sparse
        q = q_raw
        if self.config.rope:
            q = apply_rope(q_raw, jnp.minimum(positions, c.n_sink + c.window - 1), freqs=self.rope_frequencies())
        B, T, H, K = q.shape
        hkv = sink_k.shape[2]
        qg = q.reshape(B, T, hkv, H // hkv, K).astype(jnp.float32)
        scores = jnp.einsum("bthgk,bjhk->bthgj", qg, sink_k.astype(jnp.float32)) * K ** -0.5
        j = jnp.arange(sink_k.shape[1])
        visible = (sink_valid[None, :] & (j[None, :] <= positions[:, None] - c.window))[None, :, None, None, :]
        p, lse = masked_softmax(scores, visible)
        o = jnp.einsum("bthgj,bjhd->bthgd", p, sink_v.astype(jnp.float32))
        return o.reshape(B, T, H, -1).astype(q_raw.dtype), lse.reshape(B, T, H)

    def project_qkv_raw(self, x: Hidden, positions) -> tuple[Float[Array, "B T H K"], Float[Array, "B T Hkv K"],
                                                             Float[Array, "B T Hkv K"], Float[Array, "B T H K"],
                                                             Float[Array, "B T Hkv K"]]:
        """(q, k, v, q_raw, k_raw): `project_qkv`'s q, k, v, and q, k before RoPE (the same arrays without it)."""
        q_raw = self._heads(self.q_proj(x), self.config.n_heads)
        k_raw = self._heads(self.k_proj(x), self.config.kv_heads)
        v = self._heads(self.v_proj(x), self.config.kv_heads)
        q, k = q_raw, k_raw
        if self.config.rope:
            freqs = self.rope_frequencies()
            q = apply_rope(q_raw, positions, freqs=freqs)
            k = apply_rope(k_raw, positions, freqs=freqs)
        return q, k, v, q_raw, k_raw

    def __call__(self, x: Hidden) -> Hidden:
        """Parallel (training) form: x [B, T, D] -> [B, T, D]."""
        B, T = x.shape[:2]
        if self.policy is not None:
            positions = jnp.arange(T, dtype=jnp.int32)
            q, k, v, q_raw, k_raw = self.project_qkv_raw(x, positions)
            o = self.policy(q, k, v, q_raw=q_raw, k_raw=k_raw, positions=positions)
            return self.o_proj(o.reshape(B, T, -1))
        n_blocks = _ceil_div(T, self.sparse.block_size)
        if self.cache_sinks:  # the window (true positions) and the sinks outside it (cache positions), merged
            c, positions = self.sparse, jnp.arange(T, dtype=jnp.int32)
            q, k, v, q_raw, _ = self.project_qkv_raw(x, positions)
            idx, cnt = sparse_patterns.block_lists(sparse_patterns.sink_window_blocks(
                n_blocks, n_blocks, block=c.block_size, n_sink=0, window=c.window))
            o, lse = self._attend_lists(q, k, v, idx, cnt, q_block=c.block_size, window_only=True)
            n = min(c.n_sink, T)
            o_sink, lse_sink = self._sink_part(q_raw, positions, k[:, :n], v[:, :n], jnp.ones((n,), bool))
            o, _ = merge_attention(o, lse, o_sink, lse_sink)
            return self.o_proj(o.reshape(B, T, -1))
        q, k, v = self.project_qkv(x, jnp.arange(T))
        idx, cnt = sparse_patterns.block_lists(self.block_mask(n_blocks, n_blocks, T))
        o = self._attend_lists(q, k, v, idx, cnt, q_block=self.sparse.block_size, seq_len=T)
        return self.o_proj(o.reshape(B, T, -1))

    # --- decoding --------------------------------------------------------------------------------------------------
    # sink_window: a bounded cache, {"sink_k", "sink_v": [B, n_sink, Hkv, K], "ring": SlidingWindowCache of `window`
    # slots}. s2 / longlora / moa / infer_dense: Attention's KV cache {"k", "v": [B, max_len, Hkv, K], "pos"}.
    # Dynamic patterns: Attention's KV cache plus the policy's own state under "policy".

    @property
    def causal(self) -> bool:
        """Whether token t's output depends only on tokens <= t: False for the non-causal patterns (biformer,
        bidir_window), which read both sides and have no decoding (tests/conformance/ skips its decode checks)."""
        return self.sparse.pattern not in NONCAUSAL_PATTERNS

    def _no_decoding(self, what: str) -> None:
        if not self.causal:
            raise ValueError(f"sparse_attention: pattern {self.sparse.pattern} is non-causal; a non-causal mixer "
                             f"cannot decode ({what})")

    @property
    def bounded_state(self) -> bool:
        """Whether the decode state stops growing (sink_window's sink + ring cache) or is a KV cache of max_len."""
        return self.sparse.pattern == "sink_window" and not self.sparse.infer_dense

    def init_state(self, batch_size: int, max_len: int, cache_dtype=jnp.float32) -> State:
        """Empty decode state: the sink + ring cache for sink_window (max_len unused: it never grows), else
        Attention's KV cache of max_len slots."""
        self._no_decoding("init_state")
        if self.policy is not None and not self.sparse.infer_dense:
            return {**super().init_state(batch_size, max_len, cache_dtype),
                    "policy": self.policy.init_state(batch_size, max_len, cache_dtype)}
        if not self.bounded_state:
            return super().init_state(batch_size, max_len, cache_dtype)
        c, hkv, K = self.sparse, self.config.kv_heads, self.head_dim
        sink = jnp.zeros((batch_size, c.n_sink, hkv, K), cache_dtype)
        return {"sink_k": sink, "sink_v": sink,
                "ring": swa_op.sliding_window_init_cache(batch_size, c.window, hkv, K, dtype=cache_dtype)}

    def state_size(self, seq_len: int, cache_dtype=jnp.float32) -> int:
        """Bytes of decode state per sequence after seq_len tokens: Attention's KV cache, or for sink_window
        2 * min(seq_len, n_sink + window) * Hkv * K * itemsize (constant past n_sink + window tokens)."""
        self._no_decoding("state_size")
        if self.policy is not None and not self.sparse.infer_dense:
            return super().state_size(seq_len, cache_dtype) + self.policy.state_size(seq_len, cache_dtype)
        if not self.bounded_state:
            return super().state_size(seq_len, cache_dtype)
        return super().state_size(min(seq_len, self.sparse.n_sink + self.sparse.window), cache_dtype)

    def prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """Runs x [B, T, D] from the state's position; returns (state after it, y [B, T, D])."""
        self._no_decoding("prefill")
        if self.sparse.infer_dense:
            return super().prefill(state, x)
        if self.policy is not None:
            return self._prefill_policy(state, x)
        if self.bounded_state:
            return self._prefill_bounded(state, x)
        return self._prefill_cache(state, x)

    def check_kv_policy(self, policy) -> None:
        """A KV policy reads a KV cache: sink_window's bounded sink + ring cache (without infer_dense) has none, and a
        dynamic pattern's policy already chooses what decoding reads; a non-causal pattern does not decode."""
        self._no_decoding(f"kv policy {policy.NAME}")
        super().check_kv_policy(policy)
        if self.policy is not None and not self.sparse.infer_dense:
            # Both would keep their decode state under "policy", and the pattern already chooses what decoding reads.
            raise ValueError(f"kv policy {policy.NAME}: mixer sparse_attention with pattern {self.sparse.pattern} "
                             "chooses its keys from the content when decoding; a KV policy applies to the static "
                             "patterns (or set sparse_attention.infer_dense)")
        if self.bounded_state:
            raise ValueError(f"kv policy {policy.NAME}: mixer sparse_attention with pattern sink_window keeps a "
                             "bounded sink + window cache, not a KV cache a policy can read (set "
                             "sparse_attention.infer_dense, or use another pattern)")

    def decode_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]:
        """One token x_t [B, D]; returns (state, y_t [B, D]). With a KV policy (set_kv_policy) the step reads the
        cache entries the policy selects instead of the pattern's (prefill keeps the pattern)."""
        self._no_decoding("decode_step")
        if self.kv_policy is not None:
            return super().decode_step(state, x_t)
        state, y = self.prefill(state, x_t[:, None])
        return state, y[:, 0]

    def _prefill_cache(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """s2 / longlora / moa over the dense KV cache: each new token is its own query block (q_block = 1) and reads
        the list of its block in the pattern built for the cache's length S (moa's N = S), so it sees what the
        parallel form over S tokens shows it."""
        B, T = x.shape[:2]
        state, q, positions = self._write(state, x)
        S, bs = state["k"].shape[1], self.sparse.block_size
        idx, cnt = sparse_patterns.block_lists(self.block_mask(_ceil_div(S, bs), _ceil_div(S, bs), S))
        rows = jnp.minimum(positions // bs, idx.shape[1] - 1)  # past the cache end the output is poisoned below
        k, v = state["k"].astype(q.dtype), state["v"].astype(q.dtype)
        o = self._attend_lists(q, k, v, jnp.asarray(idx)[:, rows], jnp.asarray(cnt)[:, rows], q_block=1, seq_len=S,
                               q_pos=positions)
        y = self.o_proj(o.reshape(B, T, -1))
        return state, jnp.where(state["pos"] <= S, y, jnp.full((), jnp.nan, y.dtype))

    def _prefill_policy(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """A dynamic pattern over Attention's KV cache: writes the new k, v as `_write` does, then the policy attends
        (and updates its own state) with the pre-RoPE q, k it may need."""
        B, T = x.shape[:2]
        pos, S = state["pos"], state["k"].shape[1]
        if not isinstance(pos, jax.core.Tracer) and int(pos) + T > S:
            raise ValueError(f"sparse_attention: KV cache of {S} slots is full (pos={int(pos)}, {T} new tokens)")
        positions = pos + jnp.arange(T, dtype=jnp.int32)
        q, k, v, q_raw, k_raw = self.project_qkv_raw(x, positions)
        cache_k = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, pos, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, pos, 0, 0))
        policy_state, o = self.policy.decode(state["policy"], q, cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                                             q_raw=q_raw, k_raw=k_raw, q_pos=positions)
        y = self.o_proj(o.reshape(B, T, -1))
        y = jnp.where(pos + T <= S, y, jnp.full((), jnp.nan, y.dtype))  # past the cache end (under jit): poisoned
        return {"k": cache_k, "v": cache_v, "pos": pos + T, "policy": policy_state}, y

    def _bounded_lists(self, n_sink_blocks: int, n_ring_blocks: int, n_chunk_blocks: int):
        """Lists of a chunk's query blocks over the layout [sink | ring | chunk], each part padded to whole blocks:
        every sink block; the ring blocks for the query blocks whose window reaches before the chunk; the chunk's
        own window blocks, and its first blocks, which hold the sinks when the chunk starts the sequence."""
        bs, w = self.sparse.block_size, self.sparse.window
        n_blocks = n_sink_blocks + n_ring_blocks + n_chunk_blocks
        qi = np.arange(n_chunk_blocks)[:, None]
        kj = np.arange(n_blocks)[None, :]
        C = kj - n_sink_blocks - n_ring_blocks  # the key block's index within the chunk
        sink = kj < n_sink_blocks
        ring = (kj >= n_sink_blocks) & (C < 0) & (qi * bs < w - 1)
        # A chunk token at position < n_sink has chunk index < n_sink (the sinks of a prompt that starts at 0).
        own = (C >= 0) & (C <= qi) & (((C + 1) * bs - 1 > qi * bs - w) | (C * bs < self.sparse.n_sink))
        return sparse_patterns.block_lists((sink | ring | own)[None])

    def _prefill_bounded(self, state: State, x: Hidden) -> tuple[State, Hidden]:
        """sink_window over the sink + ring cache. The keys are [sinks | ring slots | the new tokens], with positions:
        sink s is valid once written before this chunk (s < pos), ring slot r holds the newest position p < pos with
        p % window = r, valid when p >= n_sink (a sink is never counted twice); the op's window / sink predicates do
        the rest, exactly as in the parallel form."""
        B, T = x.shape[:2]
        c, bs = self.sparse, self.sparse.block_size
        ring: swa_op.SlidingWindowCache = state["ring"]
        pos, W = ring.pos, c.window
        positions = pos + jnp.arange(T, dtype=jnp.int32)
        q, k, v, q_raw, _ = self.project_qkv_raw(x, positions)

        def padded(a, n):  # [B, L, ...] -> [B, n, ...]
            return jnp.pad(a, ((0, 0), (0, n - a.shape[1])) + ((0, 0),) * (a.ndim - 2))

        n_sink_blocks, n_ring_blocks, n_chunk_blocks = _ceil_div(c.n_sink, bs), _ceil_div(W, bs), _ceil_div(T, bs)
        s1, s2, s3 = n_sink_blocks * bs, n_ring_blocks * bs, n_chunk_blocks * bs
        slots = jnp.arange(W)
        ring_pos = pos - 1 - jnp.mod(pos - 1 - slots, W)
        sink_pos = jnp.arange(c.n_sink)
        kv_pos = jnp.concatenate([  # padding slots get position -1: never visible
            jnp.pad(jnp.where(sink_pos < pos, sink_pos, -1), (0, s1 - c.n_sink), constant_values=-1),
            jnp.pad(jnp.where(ring_pos >= c.n_sink, ring_pos, -1), (0, s2 - W), constant_values=-1),
            pos + jnp.arange(s3, dtype=jnp.int32)])
        keys = jnp.concatenate([padded(state["sink_k"].astype(q.dtype), s1), padded(ring.k.astype(q.dtype), s2),
                                padded(k, s3)], axis=1)
        values = jnp.concatenate([padded(state["sink_v"].astype(q.dtype), s1), padded(ring.v.astype(q.dtype), s2),
                                  padded(v, s3)], axis=1)
        idx, cnt = self._bounded_lists(n_sink_blocks, n_ring_blocks, n_chunk_blocks)
        out = self._attend_lists(padded(q, s3), keys, values, idx, cnt, q_block=bs,
                                 q_pos=pos + jnp.arange(s3, dtype=jnp.int32), kv_pos=kv_pos,
                                 window_only=self.cache_sinks)
        if not self.cache_sinks:
            o = out[:, :T]

        # Writes: sink s <- new token s - pos; ring slot r <- the newest new position p with p % W = r, if any.
        def take(a, i):  # a [B, T, ...] at token indices i [n] (clipped; the unused ones are masked by the caller)
            return jnp.take(a, jnp.clip(i, 0, T - 1), axis=1)

        def put(old, new, i, write):
            return jnp.where(write[None, :, None, None], take(new, i).astype(old.dtype), old)

        sink_write = (sink_pos >= pos) & (sink_pos < pos + T)
        newest = pos + T - 1 - jnp.mod(pos + T - 1 - slots, W)
        ring_write = newest >= pos
        new_state = {
            "sink_k": put(state["sink_k"], k, sink_pos - pos, sink_write),
            "sink_v": put(state["sink_v"], v, sink_pos - pos, sink_write),
            "ring": swa_op.SlidingWindowCache(put(ring.k, k, newest - pos, ring_write),
                                              put(ring.v, v, newest - pos, ring_write), pos + T),
        }
        if self.cache_sinks:  # the sinks outside the window, from the sink cache this chunk has completed
            o_sink, lse_sink = self._sink_part(q_raw, positions, new_state["sink_k"].astype(q.dtype),
                                               new_state["sink_v"].astype(q.dtype), sink_pos < pos + T)
            o, _ = merge_attention(out[0][:, :T], out[1][:, :T], o_sink, lse_sink)
        y = self.o_proj(o.reshape(B, T, -1))
        return new_state, y
