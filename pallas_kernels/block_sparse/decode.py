"""sparse_decode_attention: one query step against a KV cache, over the selected tokens or blocks only.

For batch row b and query head h in list group g (g = 0, h // (Hq / Hkv) or h for Hs = 1, Hkv or Hq, as in
`block_sparse_attention`), with KV head h // (Hq / Hkv) and len = lengths[b] (S when lengths is None):

    sel(b, g) = {idx[b, g, c] : c < cnt[b, g]}                          granularity "token": cache positions
              = {J·block + r : J = idx[b, g, c], c < cnt[b, g], 0 ≤ r < block}     "block": blocks of `block` tokens
    visible   = {j ∈ sel(b, g) : 0 ≤ j < min(S, len)}
    o = Σ_{j visible} softmax_j(scale · q·k_j) v_j,   lse = log Σ_{j visible} exp(scale · q·k_j)

With `key_shift` (int32 [B, Hs, K]) and `rope_freqs` ([D/2]), every key read through list entry c is re-rotated by
key_shift[b, g, c] positions before scoring: the cache holds keys rotated at their true positions p (RoPE,
arXiv 2104.09864, pairs (x_i, x_{i+D/2}) as layers/rope.py), and a rotation composes, R(p + δ) = R(δ)·R(p), so the
key is scored as if it sat at p + δ (LongHeads' re-assigned positions, arXiv 2402.10685 §3.2). The caller rotates the
query to its own new position. Values are not rotated.

An empty visible set gives o = 0 and lse = −inf (with finite gradients), so a part that reads nothing joins others
through `merge_attention` unchanged. Listed ids are unique; concrete lists are checked (one-line ValueError), traced
ids outside [0, n) are ignored. The decode-time KV policies (layers/kv_policies/) write the lists; the op is
policy-free.

Implementations:
- "reference": `block_sparse_reference` with one query row (the dense boolean mask over all S cache entries): the
  oracle. With `key_shift`, each query head gets its own copy of the cache rotated by its list's shifts.
- "xla": gathers only the listed entries, K and V each [B, Hkv, Gs, K·(block or 1), D] (Gs = Hq / Hkv when
  Hs = Hq, else 1), straight from the [B, S, Hkv, D] cache: O(K) of the cache is read, never O(S); float32 scores
  and softmax; autodiff backward (the gathers' scatter-add).
- "pallas_gpu" / "pallas_tpu": the Triton and Mosaic kernels (decode_pallas_gpu.py, decode_pallas_tpu.py, wired in
  decode_pallas.py): flash-decoding's online softmax over the selected blocks, or over the selected tokens gathered
  in chunks, reading O(K) of the cache in its own layout; the GPU kernel splits a list over several programs and
  merges them by lse. Forward only. Opt-in (never in DEFAULT_ORDER) until scripts/gpu_check.sh (or a TPU run) has
  shown them correct and faster than the gather on the device; on CPU they run in interpret mode
  (`EFFARCH_PALLAS_INTERPRET=1`).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse.decode_pallas import sparse_decode_pallas
from effarch.pallas_kernels.block_sparse.reference import block_sparse_reference, group_of_heads, masked_softmax
from effarch.pallas_kernels.dispatch import dispatch

OP = "sparse_decode_attention"
DEFAULT_ORDER = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}
GRANULARITIES = ("token", "block")


def _unit(granularity: str, block) -> int:
    """Tokens per listed id."""
    return 1 if granularity == "token" else int(block)


def check_inputs(q, k_cache, v_cache, idx, cnt, *, granularity: str, block, lengths) -> None:
    """Raises ValueError naming the argument whose shape (or, for concrete lists, whose values) breaks the contract."""
    if q.ndim != 3:
        raise ValueError(f"{OP}: q must be [B, Hq, D], got {q.shape}")
    B, Hq, D = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"{OP}: k_cache must be [B={B}, S, Hkv, D={D}], got {k_cache.shape}")
    S, Hkv = k_cache.shape[1:3]
    if v_cache.ndim != 4 or v_cache.shape[:3] != (B, S, Hkv):
        raise ValueError(f"{OP}: v_cache must be [B={B}, S={S}, Hkv={Hkv}, Dv], got {v_cache.shape}")
    if Hq % Hkv:
        raise ValueError(f"{OP}: query heads {Hq} must be a multiple of kv heads {Hkv}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{OP}: granularity must be 'token' or 'block', got {granularity!r}")
    if granularity == "block" and (block is None or int(block) < 1):
        raise ValueError(f"{OP}: granularity='block' needs block >= 1 tokens, got block={block}")
    if granularity == "token" and block not in (None, 1):
        raise ValueError(f"{OP}: block={block} is only meaningful with granularity='block'")
    if idx.ndim != 3 or idx.shape[0] != B:
        raise ValueError(f"{OP}: idx must be [B={B}, Hs, K], got {idx.shape}")
    group_of_heads(Hq, Hkv, idx.shape[1])
    if cnt.shape != idx.shape[:2]:
        raise ValueError(f"{OP}: cnt must be [B, Hs] = {idx.shape[:2]}, got {cnt.shape}")
    if lengths is not None and np.shape(lengths) != (B,):
        raise ValueError(f"{OP}: lengths must be [B={B}], got {np.shape(lengths)}")
    if any(isinstance(a, jax.core.Tracer) for a in (idx, cnt)):
        return
    n = -(-S // _unit(granularity, block))
    ids, counts = np.asarray(idx), np.asarray(cnt)
    K = ids.shape[-1]
    if counts.min(initial=0) < 0 or counts.max(initial=0) > K:
        raise ValueError(f"{OP}: cnt must lie in [0, K={K}], got values in [{counts.min()}, {counts.max()}]")
    used = np.arange(K) < counts[..., None]
    bad = used & ((ids < 0) | (ids >= n))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{OP}: idx{list(where)} = {ids[where]} is outside [0, {n}) ({granularity} ids of a "
                         f"{S}-slot cache)")
    distinct = np.where(used, ids, -1 - np.arange(K))  # unused slots never collide
    if (np.diff(np.sort(distinct, axis=-1), axis=-1) == 0).any():
        raise ValueError(f"{OP}: idx lists an entry twice in one row; each selected {granularity} must be unique")


def _lengths(lengths, B: int, S: int) -> Int[Array, " B"]:
    return jnp.full((B,), S, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)


def sparse_decode_reference(q, k_cache, v_cache, idx, cnt, *, granularity="token", block=None, lengths=None,
                            scale=None, return_lse=True, key_shift=None, rope_freqs=None):
    """The dense oracle: block_sparse_reference with one query row, key block = the unit, padding past lengths."""
    if key_shift is not None:
        return _reference_shifted(q, k_cache, v_cache, idx, cnt, granularity=granularity, block=block,
                                  lengths=lengths, scale=scale, return_lse=return_lse, key_shift=key_shift,
                                  rope_freqs=rope_freqs)
    B, S = k_cache.shape[:2]
    unit = _unit(granularity, block)
    kv_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    kv_pos = jnp.where(kv_pos < _lengths(lengths, B, S)[:, None], kv_pos, -1)  # negative = never visible
    out = block_sparse_reference(q[:, None], k_cache, v_cache, idx[:, :, None, :], cnt[:, :, None], q_block=1,
                                 kv_block=unit, causal=False, kv_pos=kv_pos, scale=scale, return_lse=return_lse)
    if not return_lse:
        return out[:, 0]
    return out[0][:, 0], out[1][:, 0]


def rotate_by(x: Float[Array, "... D"], delta: Int[Array, "..."], freqs: Float[Array, " D2"]) -> Array:
    """x rotated by `delta` positions with RoPE frequencies `freqs` (pairs (x_i, x_{i+D/2})), in float32."""
    angles = delta.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32).reshape((1,) * delta.ndim + (-1,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _reference_shifted(q, k_cache, v_cache, idx, cnt, *, granularity, block, lengths, scale, return_lse, key_shift,
                       rope_freqs):
    """The oracle with re-rotated keys: one list and one rotated copy of the cache per query head (MHA form)."""
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1:3]
    Hs = idx.shape[1]
    g_of_h = jnp.arange(Hq) * Hs // Hq  # the list query head h reads (Hs = 1, Hkv or Hq)
    pos, vis = gathered_positions(idx, cnt, granularity=granularity, block=block, S=S, lengths=lengths)
    shift = jnp.repeat(jnp.asarray(key_shift, jnp.int32), _unit(granularity, block), axis=-1)  # [B, Hs, N]
    b_i, g_i = jnp.arange(B)[:, None, None], jnp.arange(Hs)[None, :, None]
    shift_pos = jnp.zeros((B, Hs, S), jnp.int32).at[b_i, g_i, jnp.where(vis, pos, S)].set(shift, mode="drop")
    k_BHSD = jnp.swapaxes(k_cache, 1, 2)[:, jnp.arange(Hq) // (Hq // Hkv)]  # [B, Hq, S, D]
    k_full = jnp.swapaxes(rotate_by(k_BHSD, shift_pos[:, g_of_h], rope_freqs), 1, 2).astype(k_cache.dtype)
    v_full = v_cache[:, :, jnp.arange(Hq) // (Hq // Hkv)]
    return sparse_decode_reference(q, k_full, v_full, idx[:, g_of_h], cnt[:, g_of_h], granularity=granularity,
                                   block=block, lengths=lengths, scale=scale, return_lse=return_lse)


def gathered_positions(idx, cnt, *, granularity: str, block, S: int, lengths) -> tuple[Array, Array]:
    """(positions [B, Hs, N], visible [B, Hs, N]) of the listed entries, N = K · unit; positions are clamped into
    [0, S) so that the gather never reads outside the cache (invisible ones are masked after)."""
    B, Hs, K = idx.shape
    unit = _unit(granularity, block)
    idx = jnp.asarray(idx, jnp.int32)
    used = jnp.arange(K)[None, None, :] < jnp.asarray(cnt, jnp.int32)[..., None]
    pos = (idx[..., None] * unit + jnp.arange(unit, dtype=jnp.int32)[None, None, None, :]).reshape(B, Hs, K * unit)
    used = jnp.repeat(used & (idx >= 0), unit, axis=-1)
    limit = jnp.minimum(_lengths(lengths, B, S), S)[:, None, None]
    visible = used & (pos >= 0) & (pos < limit)
    return jnp.clip(pos, 0, S - 1), visible


def sparse_decode_xla(q, k_cache, v_cache, idx, cnt, *, granularity="token", block=None, lengths=None, scale=None,
                      return_lse=True, key_shift=None, rope_freqs=None):
    """Gathers the listed entries of K and V (module docstring) and attends over them in float32."""
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1:3]
    G, Hs = Hq // Hkv, idx.shape[1]
    scale = D**-0.5 if scale is None else scale
    pos_BsN, vis_BsN = gathered_positions(idx, cnt, granularity=granularity, block=block, S=S, lengths=lengths)
    N = pos_BsN.shape[-1]
    # Lists as [B, Hl, Gs, N]: Hs = 1 is broadcast over the KV heads, Hs = Hq splits into (KV head, query in group).
    Gs = G if Hs == Hq and Hq != Hkv else 1
    pos = pos_BsN.reshape(B, -1, Gs, N)
    vis = vis_BsN.reshape(B, -1, Gs, N)
    pos = jnp.broadcast_to(pos, (B, Hkv, Gs, N))
    vis = jnp.broadcast_to(vis, (B, Hkv, Gs, N))
    b_i = jnp.arange(B)[:, None, None, None]
    h_i = jnp.arange(Hkv)[None, :, None, None]
    k_BHgND = k_cache[b_i, pos, h_i].astype(q.dtype)  # one gather: only the listed rows are read
    v_BHgNV = v_cache[b_i, pos, h_i]
    if key_shift is not None:  # the gathered keys only: O(K) rotations
        shift = jnp.repeat(jnp.asarray(key_shift, jnp.int32), _unit(granularity, block), axis=-1)
        shift = jnp.broadcast_to(shift.reshape(B, -1, Gs, N), (B, Hkv, Gs, N))
        k_BHgND = rotate_by(k_BHgND, shift, rope_freqs).astype(q.dtype)

    q_BHGD = q.reshape(B, Hkv, G, D)
    if Gs == 1:
        s = jnp.einsum("BHGD,BHND->BHGN", q_BHGD, k_BHgND[:, :, 0], preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("BHGD,BHGND->BHGN", q_BHGD, k_BHgND, preferred_element_type=jnp.float32)
    p, lse = masked_softmax(s * scale, vis)  # an empty selection: p = 0, lse = -inf, finite gradients
    v32 = v_BHgNV.astype(jnp.float32)
    if Gs == 1:
        o = jnp.einsum("BHGN,BHNV->BHGV", p, v32[:, :, 0])
    else:
        o = jnp.einsum("BHGN,BHGNV->BHGV", p, v32)
    o = o.reshape(B, Hq, -1).astype(q.dtype)
    if not return_lse:
        return o
    return o, lse.reshape(B, Hq)


IMPLEMENTATIONS = {"reference": sparse_decode_reference, "xla": sparse_decode_xla}
# The kernels: opt-in (never in DEFAULT_ORDER) until scripts/gpu_check.sh or a TPU run has shown them correct and
# faster than the gather there.
IMPLEMENTATIONS["pallas_gpu"] = functools.partial(sparse_decode_pallas, "pallas_gpu")
IMPLEMENTATIONS["pallas_tpu"] = functools.partial(sparse_decode_pallas, "pallas_tpu")


def sparse_decode_attention(
    q: Float[Array, "B Hq D"],
    k_cache: Float[Array, "B S Hkv D"],
    v_cache: Float[Array, "B S Hkv Dv"],
    idx: Int[Array | np.ndarray, "B Hs K"],
    cnt: Int[Array | np.ndarray, "B Hs"],
    *,
    granularity: str = "token",
    block: int | None = None,
    lengths: Array | np.ndarray | None = None,  # int [B]; checked by check_inputs with a one-line error
    return_lse: bool = True,
    implementation: str | Sequence[str] | None = None,
    scale: float | None = None,
    key_shift: Int[Array | np.ndarray, "B Hs K"] | None = None,
    rope_freqs: Float[Array | np.ndarray, " D2"] | None = None,
):
    """Attention of one query step over the selected cache entries only (module docstring).

    Args:
      q: the step's queries [B, Hq, D]; k_cache [B, S, Hkv, D], v_cache [B, S, Hkv, Dv], Hq a multiple of Hkv.
      idx: int32 [B, Hs, K]: token positions (granularity "token") or block ids of `block` tokens ("block"), any
        order, unique; Hs = 1 (all heads), Hkv (per GQA group) or Hq (per query head).
      cnt: int32 [B, Hs]; entries c >= cnt of a list are ignored.
      granularity, block: "token", or "block" with `block` tokens per id (the last block may be partial).
      lengths: int32 [B] valid cache lengths (entries at or past them are never visible); None = S.
      return_lse: also return the float32 log-sum-exp [B, Hq] (-inf where nothing is visible), for
        `merge_attention`.
      implementation: "reference", "xla", "pallas_gpu", "pallas_tpu", a sequence tried in order, or None (the
        platform default: "xla").
      scale: logit scale, default 1 / sqrt(D).
      key_shift: int32 [B, Hs, K] or None: the keys read through list entry c are re-rotated by key_shift[b, g, c]
        positions (module docstring); needs `rope_freqs` [D/2], the RoPE inverse frequencies of the cached keys.

    Returns:
      o [B, Hq, Dv] in q's dtype (0 where nothing is visible), and lse [B, Hq] when return_lse.
    """
    check_inputs(q, k_cache, v_cache, idx, cnt, granularity=granularity, block=block, lengths=lengths)
    if key_shift is not None:
        if np.shape(key_shift) != tuple(idx.shape):
            raise ValueError(f"{OP}: key_shift must be [B, Hs, K] = {tuple(idx.shape)}, got {np.shape(key_shift)}")
        if rope_freqs is None or np.shape(rope_freqs) != (q.shape[-1] // 2,) or q.shape[-1] % 2:
            raise ValueError(f"{OP}: key_shift needs rope_freqs [D/2 = {q.shape[-1] // 2}] (an even D), got "
                             f"{None if rope_freqs is None else np.shape(rope_freqs)}")
        key_shift = jnp.asarray(key_shift, jnp.int32)
    idx, cnt = jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    return dispatch(OP, IMPLEMENTATIONS, implementation, q, k_cache, v_cache, idx, cnt, granularity=granularity,
                    block=block, lengths=lengths, scale=scale, return_lse=return_lse, key_shift=key_shift,
                    rope_freqs=rope_freqs, default_order=DEFAULT_ORDER)
