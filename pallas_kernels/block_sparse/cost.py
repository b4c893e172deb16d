"""Cost estimates (`pl.CostEstimate`) of the block-sparse kernels (pallas_tpu.py, pallas_gpu.py), from their shapes
and the share of the list slots that are used.

XLA cannot see into a kernel: without `cost_estimate=` a `pallas_call` adds nothing to `compiled.cost_analysis()`.
The numbers count the work of the listed (query block, key block) pairs only, at the tile sizes the kernel runs (bq,
bk rows; Dp, Dvp padded head dims; the padding is computed too). The pair count is `Tiling.density` × the list slots
(B · Hs · nQb · Kmax): exact for concrete lists, the worst case (every slot used) for traced ones. Each pair is
computed once per query head:
- forward: s = q kᵀ and p v, 2·bq·bk·(Dp + Dvp) flops; exp of every logit (bq·bk transcendentals);
- dQ pass: s, dp = dO vᵀ and dq += ds k, 2·bq·bk·(2·Dp + Dvp); dK/dV pass: s, dv += pᵀ dO, dp, dk += dsᵀ q,
  2·bq·bk·(2·Dp + 2·Dvp); both recompute the exp;
- bytes: every query-side block (q, dO, o, dq, lse rows) once per program, and the key-side blocks (k, v) once per
  listed pair and program (the TPU pipeline skips a repeated block; the count is the upper bound).
"""

from jax.experimental import pallas as pl

from effarch.pallas_kernels.block_sparse.layout import Tiling

F32_BYTES = 4


def _pairs(t: Tiling, batch: int) -> int:
    """Listed (I, J) pairs of this call's lists (local to a device block under shard_map)."""
    return int(round(t.density * batch * t.n_groups * t.n_q_blocks * t.kmax))


def _estimate(t, batch, programs, gq, per_pair_flops, q_bytes_per_token, kv_bytes_per_pair):
    pairs = _pairs(t, batch)
    heads_per_list = programs * gq // t.n_groups  # query heads that one list serves
    programs_per_list = programs // t.n_groups
    tokens = batch * programs * gq * t.n_q_blocks * t.bq
    return pl.CostEstimate(
        flops=int(pairs * heads_per_list * per_pair_flops),
        transcendentals=int(pairs * heads_per_list * t.bq * t.bk),
        bytes_accessed=int(tokens * q_bytes_per_token + pairs * programs_per_list * kv_bytes_per_pair),
    )


def forward(t: Tiling, batch: int, programs: int, gq: int, dp: int, dvp: int, itemsize: int) -> pl.CostEstimate:
    """The forward kernel: q read, o and lse written, k and v per listed pair."""
    return _estimate(t, batch, programs, gq, 2 * t.bq * t.bk * (dp + dvp), (dp + dvp) * itemsize + F32_BYTES,
                     t.bk * (dp + dvp) * itemsize)


def backward_dq(t: Tiling, batch: int, programs: int, gq: int, dp: int, dvp: int, itemsize: int) -> pl.CostEstimate:
    """The dQ kernel: q, dO, lse and delta read, dq written, k and v per listed pair."""
    return _estimate(t, batch, programs, gq, 2 * t.bq * t.bk * (2 * dp + dvp),
                     (2 * dp + dvp) * itemsize + 2 * F32_BYTES, t.bk * (dp + dvp) * itemsize)


def backward_dkv(t: Tiling, batch: int, programs: int, gq: int, dp: int, dvp: int, itemsize: int) -> pl.CostEstimate:
    """The dK/dV kernel: k, v read and dk, dv written once per key block and program (counted with the pairs), q,
    dO, lse and delta per listed pair."""
    return _estimate(t, batch, programs, gq, 2 * t.bq * t.bk * (2 * dp + 2 * dvp), 0,
                     t.bk * 2 * (dp + dvp) * itemsize + gq * t.bq * ((dp + dvp) * itemsize + 2 * F32_BYTES))
