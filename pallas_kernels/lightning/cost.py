"""Cost estimates (`pl.CostEstimate`) of the Lightning kernels, from their shapes: what XLA's cost analysis counts
for each `pallas_call` of pallas_tpu.py and pallas_gpu.py.

XLA cannot see into a kernel: without `cost_estimate=` a `pallas_call` adds no flops to `compiled.cost_analysis()`
and the program's roofline estimate (`optimal_seconds`) leaves the kernel out. The numbers are the chunked
algorithm's work (chunk_math.py, Lightning Attention-2 Alg. 5 / Alg. 6) for one (batch, head, chunk), times
B·H·N, at the sizes the kernel runs (C, K, V after its rounding or zero padding; the padding is computed too):
- flops: each matmul [m, k] × [k, n] as 2·m·k·n, each elementwise product or sum once per element;
- transcendentals: the exps of the decay factors (chunk_math.intra_decays / inter_decays). The [C, C] mask is
  recomputed at every chunk on TPU (one grid step per chunk) and once per (batch, head) program on GPU
  (`mask_per_chunk`);
- bytes_accessed: every input chunk read and every output chunk written once (q, k, v, dO in `itemsize`, the
  outputs in the inputs' dtype; states and rates float32). The running state stays on chip.
"""

from jax.experimental import pallas as pl

F32_BYTES = 4


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _exps(batch: int, heads: int, chunks: int, c: int, mask_per_chunk: bool) -> int:
    """exp calls of chunk_math's decays: the [C, C] mask and C query decays (per chunk or per program), then C key
    decays and λ^L per chunk."""
    masks = batch * heads * (chunks if mask_per_chunk else 1)
    return masks * (c * c + c) + batch * heads * chunks * (c + 1)


def _estimate(flops_per_chunk, batch, heads, chunks, c, mask_per_chunk, bytes_accessed) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=int(batch * heads * chunks * flops_per_chunk),
        transcendentals=int(_exps(batch, heads, chunks, c, mask_per_chunk)),
        bytes_accessed=int(bytes_accessed),
    )


def forward(
    batch: int, heads: int, chunks: int, c: int, k: int, v: int, itemsize: int, *, mask_per_chunk: bool
) -> pl.CostEstimate:
    """Alg. 5 (chunk_math.forward): O = [(Q Kᵀ) ⊙ M] V + (Q S) ⊙ qd, S ← λ^L S + (K ⊙ kd)ᵀ V."""
    flops = (
        _mm(c, k, c) + c * c  # Q Kᵀ ⊙ M
        + _mm(c, c, v) + _mm(c, k, v) + 2 * c * v  # · V, + (Q S) ⊙ qd
        + c * k + _mm(k, c, v) + 2 * k * v  # λ^L S + (K ⊙ kd)ᵀ V
    )
    tokens = batch * heads * chunks * c
    state = batch * heads * k * v * F32_BYTES
    io = tokens * (2 * k + v) * itemsize + tokens * v * itemsize + 2 * state + heads * F32_BYTES
    return _estimate(flops, batch, heads, chunks, c, mask_per_chunk, io)


def backward_dq(
    batch: int, heads: int, chunks: int, c: int, k: int, v: int, itemsize: int, *, mask_per_chunk: bool
) -> pl.CostEstimate:
    """Alg. 6 pass 1 (chunk_math.backward_dq): dQ = [(dO Vᵀ) ⊙ M] K + (dO Sᵀ) ⊙ qd, S recomputed."""
    flops = (
        _mm(c, v, c) + c * c  # dO Vᵀ ⊙ M
        + _mm(c, c, k) + _mm(c, v, k) + 2 * c * k  # · K, + (dO Sᵀ) ⊙ qd
        + c * k + _mm(k, c, v) + 2 * k * v  # the state update
    )
    tokens = batch * heads * chunks * c
    io = tokens * (k + 2 * v) * itemsize + tokens * k * itemsize + batch * heads * k * v * F32_BYTES
    return _estimate(flops, batch, heads, chunks, c, mask_per_chunk, io + heads * F32_BYTES)


def backward_dkv(
    batch: int, heads: int, chunks: int, c: int, k: int, v: int, itemsize: int, *, mask_per_chunk: bool
) -> pl.CostEstimate:
    """Alg. 6 pass 2 (chunk_math.backward_dkv): dK, dV from the recomputed [C, C] scores and dS, dS carried back."""
    flops = (
        _mm(c, k, c) + _mm(c, v, c) + 2 * c * c  # Q Kᵀ ⊙ M and dO Vᵀ ⊙ M
        + c * k + _mm(c, c, k) + _mm(c, v, k) + 2 * c * k  # K ⊙ kd; dK = dScoresᵀ Q + (V dSᵀ) ⊙ kd
        + _mm(c, c, v) + _mm(c, k, v) + c * v  # dV = Scoresᵀ dO + (K ⊙ kd) dS
        + c * k + _mm(k, c, v) + 2 * k * v  # dS ← λ^L dS + (Q ⊙ qd)ᵀ dO
    )
    tokens = batch * heads * chunks * c
    state = batch * heads * k * v * F32_BYTES
    io = tokens * (2 * k + 2 * v) * itemsize + tokens * (k + v) * itemsize + 2 * state + heads * F32_BYTES
    return _estimate(flops, batch, heads, chunks, c, mask_per_chunk, io)
