"""Static block-sparse attention patterns: which key blocks each query block of each head group reads.

Pure numpy, run once at trace time for a static sequence length; `layers/sparse_attention.py` passes the lists to
`pallas_kernels.block_sparse.block_sparse_attention`, whose causal / window / sink predicates then cut the listed
blocks down to exact token sets. Every builder returns a boolean block mask `allowed [Hs, nQb, nKb]` (Hs list
groups: 1, or one per KV head); `block_lists` compacts it into the op's `(block_idx, block_cnt)`.

Patterns (the layer's docstring says which paper each follows):
- `sink_window_blocks`: StreamingLLM (arXiv 2309.17453 §3.2): the blocks holding the first n_sink tokens and the
  blocks a causal window of `window` keys can reach; one list for all heads.
- `s2_blocks`: S2-Attention (arXiv 2407.17678 §3, linxihui/dkernel@0d4e90e `utils.py::get_sparse_attn_mask`,
  causal, absolute strides): KV head h of the sparse heads reads the `local_blocks` newest blocks and every block J
  with (J + h·s) mod vert_stride = 0, s = max(1, int(vert_stride / n_q_heads)); the last `dense_heads` KV heads
  read every causal block.
- `longlora_blocks`: LongLoRA's shifted sparse attention S²-Attn (arXiv 2309.12307 §3.2) in the form of its flash
  path (dvlab-research/LongLoRA@d4eb344 `llama_attn_replace.py::forward_flashattn`): groups of `group_size` tokens,
  the second half of the head groups shifted by group_size / 2, the shifted half's first and last half-groups
  their own groups. No token roll, so no query sees a key from the other end of the sequence.
- `moa_blocks`: MoA's elastic spans (Fu et al., arXiv 2406.14909, its elastic rule search space; thu-nics/MoA):
  KV head h of a layer sees a causal span of S_h(N) = α_h + β_h·N tokens for a sequence of N tokens, its first
  tokens being sinks. `moa_spans` turns (α, β, N) into the per-head window and sink counts of the op's predicates,
  so the span is token-exact.
- `bidir_window_blocks`: a non-causal window of whole blocks, the k blocks centred on the query block (shifted
  inward at the ends, so every row reads exactly min(k, nKb)): the equal-cost static counterpart of BiFormer's
  routing (layers/sparse_biformer.py), which reads k routed blocks per query block.

MoA's span is token-granular here. MoA's profiling layout is block-granular (thu-nics/MoA
`MoA/universal/elastic_block_sparse.py`: a band of int(α / 64 + β·nB) blocks of 64 plus one global block), but its
inference cache is token-granular (`moa_config_to_cache_config`: int(α + β·N) tokens per head, 64 of them sinks, the
rest a local window), and it is the inference rule that defines the model a plan describes: `moa_spans` follows it,
without MoA's rounding of the cache up to a multiple of 64 and its floor of 128 tokens (kernel tiling choices of its
GPU cache, not part of the rule). The block lists only bound which blocks the op visits; the window / sink
predicates cut them to the exact tokens.
"""

import numpy as np


def block_lists(allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compacts a block mask [Hs, nQb, nKb] into int32 lists: block_idx [Hs, nQb, Kmax] (ascending block ids, -1
    after block_cnt) and block_cnt [Hs, nQb]; Kmax = the longest row (at least 1)."""
    allowed = np.asarray(allowed, bool)
    cnt = allowed.sum(-1).astype(np.int32)
    kmax = max(int(cnt.max(initial=0)), 1)
    # A stable sort of "not allowed" puts the allowed ids first, in ascending order.
    order = np.argsort(~allowed, axis=-1, kind="stable")[..., :kmax]
    idx = np.where(np.arange(kmax) < cnt[..., None], order, -1).astype(np.int32)
    return idx, cnt


def _grid(n_q_blocks: int, n_kv_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n_q_blocks)[:, None], np.arange(n_kv_blocks)[None, :]


def sink_window_blocks(n_q_blocks: int, n_kv_blocks: int, *, block: int, n_sink: int, window: int) -> np.ndarray:
    """[1, nQb, nKb]: key block J is listed for query block I when J <= I and J holds a sink token (< n_sink) or a
    key some query of I sees in its window (q - window < k, i.e. J's last token > I's first token - window)."""
    qi, kj = _grid(n_q_blocks, n_kv_blocks)
    sink = kj * block < n_sink
    in_window = (kj + 1) * block - 1 > qi * block - window
    return ((kj <= qi) & (sink | in_window))[None]


def s2_blocks(n_q_blocks: int, n_kv_blocks: int, *, n_kv_heads: int, n_q_heads: int, local_blocks: int,
              vert_stride: int, dense_heads: int = 0) -> np.ndarray:
    """[Hkv, nQb, nKb]: KV head h (its query heads share the list) reads the causal blocks J <= I with
    I - J < local_blocks or (J + h·s) mod vert_stride == 0, s = max(1, int(vert_stride / n_q_heads)) (dkernel's
    head_sliding_step, offset 0); heads h >= n_kv_heads - dense_heads read every causal block.

    With s = 1 (n_q_heads >= vert_stride) any vert_stride consecutive sparse heads read disjoint stride residues,
    so together they cover every earlier block: the heterogeneous context sharding of the paper's §3.
    """
    qi, kj = _grid(n_q_blocks, n_kv_blocks)
    step = max(1, int(vert_stride / n_q_heads))
    h = np.arange(n_kv_heads)[:, None, None]
    strided = (kj[None] + h * step) % vert_stride == 0
    dense = h >= n_kv_heads - dense_heads
    return (kj <= qi)[None] & ((qi - kj < local_blocks)[None] | strided | dense)


def longlora_blocks(n_q_blocks: int, n_kv_blocks: int, *, block: int, group_size: int, n_groups: int) -> np.ndarray:
    """[n_groups, nQb, nKb]: with half-groups of G/2 tokens (m = index of a block's half-group), list groups
    g < n_groups / 2 read the G-token groups [kG, (k+1)G) (query half-group m reads m - 1 too when m is odd), the
    others the groups shifted by G/2 ([0, G/2) alone, then [G/2 + kG, G/2 + (k+1)G): m reads m - 1 when m is even
    and >= 2). block must divide G/2; the op's causal predicate cuts the diagonal half-group to j <= i."""
    half = group_size // 2
    if half % block:
        raise ValueError(f"block {block} must divide group_size / 2 = {half}")
    qi, kj = _grid(n_q_blocks, n_kv_blocks)
    m, n = qi * block // half, kj * block // half
    same = n == m
    unshifted = same | ((m % 2 == 1) & (n == m - 1))
    shifted = same | ((m % 2 == 0) & (m >= 2) & (n == m - 1))
    first_half = np.arange(n_groups)[:, None, None] < n_groups // 2
    return (kj <= qi)[None] & np.where(first_half, unshifted[None], shifted[None])


def moa_spans(alpha, beta, n_tokens: int, n_sink: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MoA's elastic rule at sequence length N = n_tokens, per head (alpha, beta [H] floats):

        S_h = clip(floor(α_h + β_h·N), 1, N)      tokens a query sees (its KV cache), sinks included
        sink_h = min(n_sink, S_h - 1)             the first sink_h tokens are always visible
        window_h = S_h - sink_h >= 1              plus the causal window t - window_h < j <= t (its own key included)

    so query t sees min(t + 1, S_h) keys: the whole causal prefix while t < S_h, then the sinks and the newest
    window_h keys. Returns (span, window, sink), int64 [H] each.
    """
    raw = np.floor(np.asarray(alpha, np.float64) + np.asarray(beta, np.float64) * n_tokens)
    span = np.clip(raw, 1, max(n_tokens, 1)).astype(np.int64)
    sink = np.minimum(n_sink, span - 1)
    return span, span - sink, sink


def moa_blocks(n_q_blocks: int, n_kv_blocks: int, *, block: int, window, n_sink) -> np.ndarray:
    """[H, nQb, nKb]: per head h (window, n_sink [H] from `moa_spans`), the blocks of `sink_window_blocks` with that
    head's window and sinks: what query blocks must visit for the op's per-group window / sink predicates."""
    return np.concatenate([sink_window_blocks(n_q_blocks, n_kv_blocks, block=block, n_sink=int(s), window=int(w))
                           for w, s in zip(np.asarray(window), np.asarray(n_sink), strict=True)])


def bidir_window_blocks(n_q_blocks: int, n_kv_blocks: int, *, k: int) -> np.ndarray:
    """[1, nQb, nKb], non-causal: query block I reads the m = min(k, nKb) blocks J in [s, s + m) with
    s = clip(I - (m - 1) // 2, 0, nKb - m): its own block, (m - 1) // 2 before it and the rest after it, the window
    moved inward where it would pass an end (same-length self-attention: nQb = nKb)."""
    qi, kj = _grid(n_q_blocks, n_kv_blocks)
    m = min(k, n_kv_blocks)
    start = np.clip(qi - (m - 1) // 2, 0, n_kv_blocks - m)
    return ((kj >= start) & (kj < start + m))[None]
