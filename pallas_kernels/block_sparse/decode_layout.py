"""The static shape the sparse_decode_attention kernels (decode_pallas_gpu.py, decode_pallas_tpu.py) share: program
heads, the chunk of cache rows one loop step reads, and the cost estimate.

Program heads. One program reads the cache of one KV head for the query heads that share its list: with one list per
GQA group or for all heads (Hs = 1 or Hkv) a program takes the group's G = Hq / Hkv query heads as G rows, so each
selected K/V row is read once for the group; with one list per query head (Hs = Hq, G > 1) a program takes 1 row.
q is viewed as [B, Hp, R, D] (Hp programs per batch row, R rows each, padded to the backend's row tile).

Chunks. A loop step reads `chunk` cache rows:
- granularity "block": one listed block, as the `chunk` (≥ block) contiguous rows from
  start = clip(J·block, 0, S − chunk); rows outside [J·block, J·block + block) are masked. Clamping the start keeps
  the read inside the cache without padding it (a partial last block reads the rows before it, masked), so the cache
  is never copied when S ≥ chunk.
- granularity "token": `chunk` consecutive list slots, gathered row by row (ids clamped into [0, S), masked after).
Either way a row is visible when its list slot is used (c < cnt), its position lies in [0, min(S, lengths[b])), and
(blocks) it belongs to the listed block, the op's contract (decode.py).
"""

import dataclasses

import jax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class DecodeTiling:
    """Static shape of one decode-kernel call (hashable: a jit-static, shard_map-closed value)."""

    granularity: str  # "token" or "block"
    block: int  # tokens per listed id (1 for "token")
    chunk: int  # cache rows per loop step
    n_steps: int  # loop steps of a full list: K (blocks) or ceil(K / chunk) (tokens)
    kmax: int  # list slots per row as laid out for the kernel (K, or K padded to n_steps · chunk for tokens)
    s: int  # cache rows (S, or chunk when a cache shorter than one chunk is padded)
    n_groups: int  # Hs
    n_programs: int  # Hp: programs per batch row
    kv_group: int  # G = Hq / Hkv
    per_head: bool  # one program per query head (Hs = Hq, G > 1)
    rows: int  # R: query heads per program, padded to the backend's row tile
    scale: float
    splits: int = 1  # GPU: programs that share one list's steps (flash-decoding's split-k), merged by lse after

    def list_group(self, p):
        """The list of program head p: 0, or p (one list per KV head or per query head)."""
        return 0 if self.n_groups == 1 else p

    def kv_head(self, p, div):
        """The KV head program head p reads (div: lax.div, a non-negative scalar division both backends lower)."""
        return div(p, self.kv_group) if self.per_head else p

    def steps_of(self, n):
        """Loop steps a list with n ≥ 0 used slots needs (lax.div: floor division lowers through a sign Mosaic
        cannot take on scalars)."""
        return n if self.granularity == "block" else jax.lax.div(n + self.chunk - 1, self.chunk)


def cost(t: DecodeTiling, batch: int, d: int, dv: int, itemsize: int) -> pl.CostEstimate:
    """Every list slot counted (traced lists: the upper bound): per step and program, q·kᵀ and p·v on R × chunk, one
    exp per logit, and the chunk's K and V rows read; q and o once per program."""
    programs = batch * t.n_programs
    logits = programs * t.n_steps * t.rows * t.chunk
    return pl.CostEstimate(
        flops=int(2 * logits * (d + dv)),
        transcendentals=int(logits),
        bytes_accessed=int(programs * (t.n_steps * t.chunk * (d + dv) + t.rows * (d + dv)) * itemsize),
    )
