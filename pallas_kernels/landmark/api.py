"""Public entry point of landmark attention (arXiv 2305.16300): `landmark_attention`, `implementation=` in
{"reference", "xla"}.

There is no Pallas kernel yet, so every platform defaults to "xla" (blockwise, O(T) score memory). Both run
everywhere; an unknown name raises ValueError (pallas_kernels/dispatch.py).
"""

from collections.abc import Mapping, Sequence

from jaxtyping import Array, Bool, Float, Int

from effarch.pallas_kernels.dispatch import dispatch
from effarch.pallas_kernels.landmark import reference, xla

DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def landmark_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    is_landmark: Bool[Array, "B T"],
    *,
    block_size: int = 64,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T H V"]:
    """Causal grouped-softmax attention over landmark-delimited blocks (paper §3; README.md), scale 1/sqrt(K).

    block(j) = number of landmarks strictly before j. Query i in block c attends directly to the regular tokens
    j <= i of block c, and to each earlier block g through the landmark closing it: weight
    e^{S_i,l_g} / Z_i times the softmax of S_ij within block g. Landmarks never contribute values, and the
    query's own block's landmark is excluded (also when i is that landmark).

    Args:
      q, k: [B, T, H, K], already rotated (the layer applies RoPE).
      v: [B, T, H, V].
      is_landmark: [B, T] bool. Any layout: windows need not start at a block boundary, blocks may differ in length.
      block_size: tile of the "xla" path (queries and keys); ignored by "reference".
      implementation: "reference" (dense, materialises [B, H, T, T]), "xla" (blockwise), a sequence of these tried
        in order, or None for the platform default.

    Returns:
      [B, T, H, V] in v's dtype. A query with nothing to attend to gives 0. A landmark whose block has no regular
      token keeps its share of Z_i and gives no value, so that row's weights sum to less than 1.
    """
    if k.shape != q.shape:
        raise ValueError(f"landmark_attention: k shape {k.shape} must equal q shape {q.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"landmark_attention: v shape {v.shape} must match q's [B, T, H] = {q.shape[:3]}")
    if is_landmark.shape != q.shape[:2]:
        raise ValueError(f"landmark_attention: is_landmark shape {is_landmark.shape} must be [B, T] = {q.shape[:2]}")
    if block_size < 1:
        raise ValueError(f"landmark_attention: block_size must be positive, got {block_size}")
    impls = {
        "reference": reference.landmark_attention_reference,
        "xla": lambda q, k, v, lm: xla.landmark_attention_xla(q, k, v, lm, block_size=block_size),
    }
    return dispatch("landmark_attention", impls, implementation, q, k, v, is_landmark, default_order=DEFAULT_ORDER)


def landmark_attention_cached(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S H K"],
    v: Float[Array, "B S H V"],
    is_landmark: Bool[Array, "B S"],
    q_positions: Int[Array, " T"],
) -> Float[Array, "B T H V"]:
    """`landmark_attention` for queries sitting at key positions `q_positions` of a longer key cache (decoding).

    A query at position p sees the keys <= p with the grouped softmax of `landmark_attention`, its block being
    block(p) of the keys; keys past p (unwritten cache slots) are invisible. Dense over S: one decode step costs
    O(S), like a KV-cache step of softmax attention.
    """
    if q_positions.shape != q.shape[1:2]:
        raise ValueError(f"landmark_attention_cached: q_positions shape {q_positions.shape} must be "
                         f"[T] = {q.shape[1:2]}")
    return reference.landmark_attention_reference(q, k, v, is_landmark, q_positions)
