"""Cost estimates (`pl.CostEstimate`) of the BASED kernels, from their shapes: what XLA's cost analysis counts for
each `pallas_call` of pallas_tpu.py and pallas_gpu.py.

XLA cannot see into a kernel: without `cost_estimate=` a `pallas_call` adds no flops to `compiled.cost_analysis()`
and the program's roofline estimate (`optimal_seconds`) leaves the kernel out. The numbers are the chunked
algorithm's work (chunk_math.py, arXiv 2402.18668 §3.1) for one (batch, head, chunk), times B·H·N, at the sizes the
kernel runs (C, F, V after its rounding or zero padding, P = padded_features(F) = 256 at F = 16; the padding is
computed too):
- flops: each matmul [m, k] × [k, n] as 2·m·k·n (the feature map's selection matmuls included), each elementwise
  product or sum once per element;
- transcendentals: none (the Taylor feature map and the weights 1 + s + s²/2 are polynomials);
- bytes_accessed: every input chunk read and every output chunk written once (q, k, v, dO in `itemsize`, the
  per-token rows 1/(den + eps) and d_den float32), plus the four feature selection matrices (float32) once per
  `weight_loads` (1 on TPU, whose constant block index copies them once; B·H on GPU, once per program). The running
  state stays on chip.
"""

from jax.experimental import pallas as pl

F32_BYTES = 4


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _features(c: int, f: int, p: int) -> int:
    """φ(X) = (X A + a0) ⊙ (X B + b0) for a [C, F] block."""
    return 2 * _mm(c, f, p) + 3 * c * p


def _features_vjp(c: int, f: int, p: int) -> int:
    """dX = (dΦ ⊙ XB) Aᵀ + (dΦ ⊙ XA) Bᵀ."""
    return 2 * _mm(c, p, f) + 2 * c * p + c * f


def _weights(c: int, f: int) -> int:
    """s = q kᵀ/√F and the causal w = 1 + s + s²/2 of a [C, C] block."""
    return _mm(c, f, c) + 5 * c * c


def _read(c: int, f: int, p: int, v: int) -> int:
    """A chunk's numerator w V + φ(Q) S, its denominator and 1/(den + eps) (chunk_math._read)."""
    return _weights(c, f) + _features(c, f, p) + _mm(c, c, v) + _mm(c, p, v) + c * v + c * c + 2 * c * p + 2 * c


def _write(c: int, f: int, p: int, v: int) -> int:
    """The state update S += φ(K)ᵀ V, z += Σ φ(K), padding rows masked (chunk_math._write)."""
    return _features(c, f, p) + c * p + _mm(p, c, v) + p * v + c * p + p


def _estimate(flops_per_chunk, batch, heads, chunks, bytes_accessed) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=int(batch * heads * chunks * flops_per_chunk), transcendentals=0, bytes_accessed=int(bytes_accessed)
    )


def _weight_bytes(f: int, p: int, weight_loads: int) -> int:
    return weight_loads * (2 * f * p + 2 * p) * F32_BYTES


def forward(
    batch: int, heads: int, chunks: int, c: int, f: int, p: int, v: int, itemsize: int, *, weight_loads: int
) -> pl.CostEstimate:
    """chunk_math.forward: o = (w V + φ(Q) S) / (den + eps), then the state update."""
    flops = _read(c, f, p, v) + _write(c, f, p, v) + c * v
    tokens = batch * heads * chunks * c
    io = tokens * (2 * f + v) * itemsize + tokens * v * itemsize + _weight_bytes(f, p, weight_loads)
    return _estimate(flops, batch, heads, chunks, io)


def backward_dq(
    batch: int, heads: int, chunks: int, c: int, f: int, p: int, v: int, itemsize: int, *, weight_loads: int
) -> pl.CostEstimate:
    """chunk_math.backward_dq: the forward's read and write again, then dQ through the weights and φ(Q)."""
    flops = (
        _read(c, f, p, v) + _write(c, f, p, v)
        + 3 * c * v + 2 * c  # d_num = dO r, d_den = −Σ (dO ⊙ num) r²
        + _mm(c, v, c) + 4 * c * c  # d_w = d_num Vᵀ + d_den (causal), d_s = d_w ⊙ (1 + s)
        + _mm(c, c, f) + c * f  # d_s K / √F
        + _mm(c, v, p) + 2 * c * p  # dΦ(Q) = d_num Sᵀ + d_den z
        + _features_vjp(c, f, p) + c * f
    )
    tokens = batch * heads * chunks * c
    io = (tokens * (2 * f + 2 * v) * itemsize + tokens * f * itemsize + 2 * tokens * F32_BYTES
          + _weight_bytes(f, p, weight_loads))
    return _estimate(flops, batch, heads, chunks, io)


def backward_dkv(
    batch: int, heads: int, chunks: int, c: int, f: int, p: int, v: int, itemsize: int, *, weight_loads: int
) -> pl.CostEstimate:
    """chunk_math.backward_dkv: dK, dV from the recomputed weights, φ(K), φ(Q) and the state's cotangents."""
    flops = (
        _weights(c, f) + c * v  # w; d_num = dO r
        + _mm(c, v, c) + 4 * c * c  # d_w, d_s
        + _mm(c, c, f) + c * f  # dK's intra-chunk part, d_sᵀ Q / √F
        + _features(c, f, p) + c * p  # φ(K), padding rows masked
        + _mm(c, c, v) + _mm(c, p, v) + c * v  # dV = wᵀ d_num + φ(K) dS
        + _mm(c, v, p) + 2 * c * p  # dΦ(K) = V dSᵀ + dz, masked
        + _features_vjp(c, f, p) + c * f
        + _features(c, f, p) + _mm(p, c, v) + p * v + 2 * c * p + p  # φ(Q); dS += φ(Q)ᵀ d_num, dz += Σ φ(Q) d_den
    )
    tokens = batch * heads * chunks * c
    io = (tokens * (2 * f + 2 * v) * itemsize + 2 * tokens * F32_BYTES + tokens * (f + v) * itemsize
          + _weight_bytes(f, p, weight_loads))
    return _estimate(flops, batch, heads, chunks, io)
