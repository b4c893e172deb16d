"""LongLoRA's S²-Attn vs dense causal attention: attention FLOPs of one fine-tuning step at T = 2048.

Claim under test (issue "Block-sparse attention", evidence `longlora`; LongLoRA, arXiv 2309.12307 §3.2 and Table
10): fine-tuning with S²-Attn (groups of G = T / 4 tokens, half of the heads shifted by G / 2) costs at most 1/3 of
dense causal attention's FLOPs. The models are those of configs/lm/longlora_finetune.yaml: 4 heads of 32 (MHA),
batch 2 x 2048; the S²-Attn layer is `sparse_attention` pattern longlora, group_size 512, blocks of 64
(configs/lm/longlora_s2.yaml). Per layer and training step (the 4 layers scale both sides alike):

- analytic, from the layer's block lists (`SparseAttention.block_mask`, the lists the op reads): the (query block,
  key block) pairs listed, against the nQb (nQb + 1) / 2 pairs of dense causal attention computed block by block (a
  flash kernel skipping the upper triangle); and the (query, key) pairs actually visible (token level: the causal
  predicate inside the diagonal blocks), against T (T + 1) / 2. Each pair costs 4·D FLOPs forward (q·k and p·v) and
  twice that backward, on both sides alike, so the ratio is that of the pairs.
- XLA's compiled cost analysis (`cost_analysis()["flops"]`) of the attention core of the two fine-tunes, forward and
  forward + backward (value_and_grad w.r.t. q, k, v): dense = `dot_product_attention(causal=True,
  implementation="xla")` (the `attention` layer's CPU path: one [T, T] score matrix per head, the upper triangle
  masked, not skipped), S²-Attn = `block_sparse_attention(implementation="xla")` with the layer's lists (Kmax key
  blocks gathered per query block, the unused slots masked). The op runs its query blocks in `lax.map` / `lax.scan`
  steps, whose body the cost analysis counts once whatever the trip count, so it is compiled here with every query
  block in one step (`q_blocks_per_step` = nQb; the same arithmetic as the default 8 steps of 4 blocks).

Result (jax 0.12.1, CPU, compile only, effarch 3fbb024), B = 2, T = 2048, H = 4, D = 32, G = 512, blocks of 64:
PASS (target <= 1/3), S²-Attn / dense:
    analytic, block pairs listed        136 / 528 per head (Kmax 8)         0.258
    analytic, token pairs visible       492,544 / 2,098,176 per head       0.235
    XLA cost analysis, forward          1.150 / 4.500 GFLOP                 0.255
    XLA cost analysis, fwd + bwd        3.366 / 13.368 GFLOP                0.252
Both XLA paths compute more than the visible pairs: the dense one the whole [T, T] matrix (2x the causal half), the
gathered one Kmax = 8 key blocks for every query block (256 block pairs for the 136 listed, 1.9x); hence a ratio
close to the analytic ones. The 4 layers scale both sides alike; the projections, MLP and head are outside these
counts (and are cheaper in (b)'s LoRA step, whose frozen weights get no gradient).
Run:   .venv/bin/python benchmarks/longlora_flops.py [--out FILE.json]
"""

import argparse
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, loss_and_grads
from flax import nnx

from effarch.layers import sparse_patterns
from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from effarch.pallas_kernels.attention import dot_product_attention
from effarch.pallas_kernels.block_sparse.xla import block_sparse_xla


def flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def analytic(mask_HQK: np.ndarray, T: int, block: int) -> dict:
    """Listed block pairs and visible token pairs per head (mean over the lists), and the dense causal counts."""
    nb = mask_HQK.shape[1]
    causal_tok = np.tril(np.ones((T, T), bool))
    tok = [np.kron(m, np.ones((block, block), bool))[:T, :T] & causal_tok for m in mask_HQK]
    listed = float(mask_HQK.sum((1, 2)).mean())
    visible = float(np.mean([t.sum() for t in tok]))
    dense_blocks, dense_tok = nb * (nb + 1) / 2, T * (T + 1) / 2
    return {"listed_block_pairs": listed, "dense_causal_block_pairs": dense_blocks,
            "block_ratio": listed / dense_blocks, "visible_token_pairs": visible,
            "dense_causal_token_pairs": dense_tok, "token_ratio": visible / dense_tok,
            "block_pairs_per_list": [int(x) for x in mask_HQK.sum((1, 2))]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--group-size", type=int, default=512)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    B, T, H, D = args.batch, args.seq_len, 4, 32

    cfg = SparseAttentionConfig(pattern="longlora", group_size=args.group_size, block_size=args.block, n_heads=H)
    layer = SparseAttention(H * D, cfg, rngs=nnx.Rngs(0))
    nb = -(-T // args.block)
    mask = layer.block_mask(nb, nb)
    idx, cnt = sparse_patterns.block_lists(mask)
    idx = jnp.broadcast_to(jnp.asarray(idx)[None], (B, *idx.shape))
    cnt = jnp.broadcast_to(jnp.asarray(cnt)[None], (B, *cnt.shape))

    def dense(q, k, v):
        return dot_product_attention(q, k, v, causal=True, implementation="xla")

    def s2(q, k, v):  # all query blocks in one step: XLA's cost analysis counts a loop body once, not per trip
        return block_sparse_xla(q, k, v, idx, cnt, q_block=args.block, kv_block=args.block, causal=True,
                                q_blocks_per_step=nb)

    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    xla = {}
    for name, fn in (("dense", dense), ("s2_attn", s2)):
        xla[name] = {"fwd": flops(fn, x, x, x), "fwd_bwd": flops(loss_and_grads(fn), x, x, x, x)}
    xla["ratio"] = {k: xla["s2_attn"][k] / xla["dense"][k] for k in ("fwd", "fwd_bwd")}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    report = {"setup": {"B": B, "T": T, "H": H, "D": D, "group_size": args.group_size, "block": args.block,
                        "Kmax": int(idx.shape[-1])},
              "analytic": analytic(mask, T, args.block), "xla_cost_analysis_flops": xla,
              "jax": jax.__version__, "commit": commit}
    return emit(report, args.out)


if __name__ == "__main__":
    main()
