"""Selection overhead of the dynamic `sparse_attention` patterns: the time each policy spends choosing its key blocks,
as a fraction of the block-sparse op's time on the lists it chose (issue "Learned and content-routed sparse
attention", evidence "Speed").

Per policy, at one length, forward only (inference), float32: `select` = the policy's parallel-form selection
(mean_topk: block means of the post-RoPE q and k, GQA-reduced scores, top-k lists per KV head; seer: the AttnGate on
the pre-RoPE q and k, top-k lists per query head; hip: HiP's hierarchical search, ceil(log2 nB) halvings that score
2(k - 1) representative keys against each block's queries, lists per KV head), `op` =
`block_sparse_attention(implementation="xla")` on those lists, `total` = the policy's whole parallel pass. Each is
jitted on its own and timed as the median of `--reps` calls after one warmup (benchmarks/_common.py
`compile_and_time`); inputs are random (the selection's cost does not depend on them). Every policy reads k =
SeerAttention's nz_ratio rule at `--density`.

Run:   .venv/bin/python benchmarks/sparse_selection.py [--seq-len 8192] [--density 0.1] [--patterns mean_topk seer hip]
       [--out FILE.json]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import compile_and_time, emit, platform_info
from flax import nnx

from effarch.layers.sparse_attention import POLICIES, SparseAttentionConfig
from effarch.pallas_kernels.block_sparse import block_sparse_attention

PATTERNS = ("mean_topk", "seer", "hip")  # the policies with a `select(q, k)` giving lists on the block grid


def measure(pattern: str, args, q, k, v) -> dict:
    cfg = SparseAttentionConfig(pattern=pattern, block_size=args.block, density=args.density, n_heads=args.heads,
                                n_kv_heads=args.kv_heads, implementation="xla")
    policy = POLICIES[pattern](cfg, n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                               rngs=nnx.Rngs(0))
    bs = args.block

    # The policy's pre-RoPE inputs are q, k themselves here (random either way).
    def select(q, k):
        return policy.select(q, k)

    def op(q, k, v, idx, cnt):
        return block_sparse_attention(q, k, v, idx, cnt, q_block=bs, kv_block=bs, implementation="xla")

    def total(q, k, v):
        return policy(q, k, v, q_raw=q, k_raw=k, positions=jnp.arange(q.shape[1]))

    idx, cnt = jax.jit(select)(q, k)
    timed = {"select": compile_and_time(select, (q, k), warmup=1, reps=args.reps),
             "op": compile_and_time(op, (q, k, v, idx, cnt), warmup=1, reps=args.reps),
             "total": compile_and_time(total, (q, k, v), warmup=1, reps=args.reps)}
    nb = -(-args.seq_len // bs)
    listed = int(np.asarray(cnt).sum())
    return {"median_s": {name: r["median_s"] for name, r in timed.items()},
            "select_over_op": timed["select"]["median_s"] / timed["op"]["median_s"],
            "list_width": int(idx.shape[-1]), "lists": int(np.prod(cnt.shape)),
            "block_density": listed / (np.prod(cnt.shape[:2]) * nb * (nb + 1) / 2), "timings": timed}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS,
                        help="the policies to measure (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_q, shape_kv, shape_kv))
    results = {pattern: measure(pattern, args, q, k, v) for pattern in args.patterns}
    return emit({"config": {**vars(args), **platform_info()}, "results": results}, args.out)


if __name__ == "__main__":
    main()
