"""Selection overhead of the dynamic `sparse_attention` patterns: the time each policy spends choosing what to attend
to, as a fraction of the attention arithmetic on what it chose (issue "Learned and content-routed sparse attention",
evidence "Speed").

Per policy, at one length, forward only (inference), float32. `total` = the policy's whole parallel pass; `select`
and `op`:
- mean_topk, seer, hip: `select` = the parallel-form selection (mean_topk: block means of the post-RoPE q and k,
  GQA-reduced scores, top-k lists per KV head; seer: the AttnGate on the pre-RoPE q and k, top-k lists per query
  head; hip: HiP's hierarchical search, ceil(log2 nB) halvings that score 2(k - 1) representative keys against each
  block's queries, lists per KV head), `op` = `block_sparse_attention(implementation="xla")` on those lists. Each
  reads k = SeerAttention's nz_ratio rule at `--density`.
- routing: `select` = the cluster of every key (nearest centroid), the (cluster, position) sort, the ranks, and the
  gathers into and out of the sorted layout; `op` = the op on the sorted layout (lists {I, I - 1}, window and
  segment predicates). `--routing-clusters` centroids, the block is the routing window.
- hyper: `select` = sortLSH at every level of the causal recursion (the hashes and stable sorts of the queries and
  keys of each off-diagonal step, as `_noncausal` computes them); `op` = total - select (the exact diagonal blocks,
  the block-diagonal op on the sorted layout, the sampled residual and the merges), `--hyper-samples`,
  `--hyper-min-len`.
`select_over_op` is the overhead ratio. Each timed part is jitted on its own and timed as the median of `--reps`
calls after one warmup (benchmarks/_common.py `compile_and_time`); inputs are random (the selection's cost does not
depend on them).

Run:   .venv/bin/python benchmarks/sparse_selection.py [--seq-len 8192] [--density 0.1]
       [--patterns mean_topk seer hip routing hyper]
       [--out FILE.json]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import LoadGate, compile_and_time, emit, platform_info
from flax import nnx

from effarch.layers.sparse_attention import POLICIES, SparseAttentionConfig
from effarch.layers.sparse_routing import cluster_ranks
from effarch.pallas_kernels.block_sparse import block_sparse_attention

PATTERNS = ("mean_topk", "seer", "hip", "routing", "hyper")


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


def _policy(pattern: str, args, **fields):
    cfg = SparseAttentionConfig(pattern=pattern, block_size=args.block, n_heads=args.heads, n_kv_heads=args.kv_heads,
                                implementation="xla", **fields)
    return POLICIES[pattern](cfg, n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                             rngs=nnx.Rngs(0))


def _record(timed: dict, select_s: float, op_s: float) -> dict:
    return {"median_s": {name: r["median_s"] for name, r in timed.items()} | {"select": select_s, "op": op_s},
            "select_over_op": select_s / op_s, "timings": timed}


def measure_routing(args, q, k, v) -> dict:
    policy = _policy("routing", args, routing_clusters=args.routing_clusters)
    B, T, Hq, K = q.shape
    Hkv, bs = k.shape[2], args.block
    G = Hq // Hkv

    def select(q, k, v):  # clusters, sort, ranks and the gathers into the sorted layout and back
        cluster = policy.clusters(k)
        order = jnp.argsort(cluster * T + jnp.arange(T, dtype=jnp.int32)[None, :, None], axis=1)
        rank = jnp.take_along_axis(cluster_ranks(cluster, args.routing_clusters), order, axis=1)
        q_s = jnp.take_along_axis(q.reshape(B, T, Hkv, G, K), order[..., None, None], axis=1)
        k_s = jnp.take_along_axis(k, order[..., None], axis=1)
        v_s = jnp.take_along_axis(v, order[..., None], axis=1)
        back = jnp.take_along_axis(q_s, jnp.argsort(order, axis=1)[..., None, None], axis=1)
        return q_s, k_s, v_s, rank, back

    fold = policy._fold
    q_s = fold(q.reshape(B, T, Hkv, G, K))
    k_s, v_s = fold(k[:, :, :, None]), fold(v[:, :, :, None])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) % bs, (B * Hkv, T))  # ranks (any: the op's cost is fixed)
    seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // (4 * bs), (B * Hkv, T))
    idx, cnt = policy.lists(-(-T // bs), B * Hkv)

    def op(q_s, k_s, v_s, pos, seg):
        return block_sparse_attention(q_s, k_s, v_s, idx, cnt, q_block=bs, kv_block=bs, causal=True, window=bs,
                                      q_pos=pos, kv_pos=pos, segment_ids=seg, implementation="xla")

    graphdef, state = nnx.split(policy)

    def total(q, k, v, state):  # the state traced, merged inside: the pass writes its commitment AuxLoss
        return nnx.merge(graphdef, state)(q, k, v)

    timed = {"select": compile_and_time(select, (q, k, v), warmup=1, reps=args.reps),
             "op": compile_and_time(op, (q_s, k_s, v_s, pos, seg), warmup=1, reps=args.reps),
             "total": compile_and_time(total, (q, k, v, state), warmup=1, reps=args.reps)}
    return _record(timed, timed["select"]["median_s"], timed["op"]["median_s"])


def measure_hyper(args, q, k, v) -> dict:
    policy = _policy("hyper", args, hyper_samples=args.hyper_samples, hyper_min_seq_len=args.hyper_min_len)
    B, T, Hq, K = q.shape
    G = Hq // k.shape[2]
    qf = jnp.moveaxis(q, 2, 1).reshape(B * Hq, T, K)
    kf = jnp.moveaxis(jnp.repeat(k, G, axis=2), 2, 1).reshape(B * Hq, T, K)

    def select(qf, kf):  # the hashes and stable sorts of every off-diagonal step of the recursion
        out, n, parts = [], T, 1
        while n > args.hyper_min_len:
            h = -(-n // 2)
            if n - h >= args.hyper_min_len:  # below it the off-diagonal step is exact (no hashing)
                for _ in range(parts):
                    out.append(jnp.argsort(policy.hash(qf[:, : n - h]), axis=1, stable=True))
                    out.append(jnp.argsort(policy.hash(kf[:, :h]), axis=1, stable=True))
            n, parts = h, parts * 2
        return out

    def total(q, k, v):
        return policy(q, k, v)

    timed = {"select": compile_and_time(select, (qf, kf), warmup=1, reps=args.reps),
             "total": compile_and_time(total, (q, k, v), warmup=1, reps=args.reps)}
    select_s = timed["select"]["median_s"]
    return _record(timed, select_s, max(timed["total"]["median_s"] - select_s, 1e-9))


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
    parser.add_argument("--routing-clusters", type=int, default=16)
    parser.add_argument("--hyper-samples", type=int, default=64)
    parser.add_argument("--hyper-min-len", type=int, default=256)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS,
                        help="the policies to measure (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gate = LoadGate()
    rng = np.random.default_rng(0)
    shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_q, shape_kv, shape_kv))
    special = {"routing": measure_routing, "hyper": measure_hyper}
    results = {pattern: special[pattern](args, q, k, v) if pattern in special else measure(pattern, args, q, k, v)
               for pattern in args.patterns}
    return emit(gate.stamp({"config": {**vars(args), **platform_info()}, "results": results}), args.out)


if __name__ == "__main__":
    main()
