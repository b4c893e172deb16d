"""CPU speed of the Titans memory recurrence: today's sequential `lax.scan` over chunks against the associative form
it replaced, forward + backward of one NeuralMemory layer, in the same run.

Why the form changed: the backward of `jax.lax.associative_scan` over the chunk axis (its stride-2 even/odd slices),
recomputed inside the checkpointed block of `pallas_kernels/titans/xla.py`, aborts XLA's TPU compiler (libtpu
0.0.52: "Cannot find a valid window for %slice_add_fusion"); pallas_kernels/titans/README.md. Target: the sequential
form no more than 10% slower than the associative one on CPU (ratio = new / old median time <= 1.10).

Setup: one NeuralMemory layer (layers/titans.py; 4 heads of 64, d_model 256, expansion 4), float32, the jitted
value_and_grad w.r.t. the layer's parameters and input of sum(layer(x) · cotangent). Cases are (chunk_size,
batch_size, T, batch): the shipped configs' mini-batch of 4 chunks (16/64, 4/16) and the longest block the op makes
by default (chunk 1, no mini-batch: 64 chunks a block). The associative form is the previous `_block` of xla.py,
kept below as the baseline and swapped in for its measurement. Calls of the two forms alternate (one warmup each),
so load changes hit both; the median of `--reps` is reported, with the load average before and after.

Run:   .venv/bin/python benchmarks/titans_scan_forms.py [--reps 7] [--out FILE]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from _common import LoadGate, emit, platform_info
from flax import nnx

from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig
from effarch.pallas_kernels.titans import xla
from effarch.pallas_kernels.titans.reference import clamp_norm, memory_apply
from effarch.pallas_kernels.titans.reference import token_losses as _token_losses

CASES = ((16, 64, 1024, 2), (4, 16, 1024, 2), (1, None, 512, 1))  # (chunk_size, batch_size, T, batch)
TOLERANCE = 1.10  # new / old median time


def _scan_op(left, right):
    a_l, x_l = left
    a_r, x_r = right
    return a_l * a_r, jax.tree.map(lambda xl, xr: a_r[..., None, None] * xl + xr, x_l, x_r)


def _linear_scan(gates, inputs, initial):
    first = jax.tree.map(lambda x, init: x.at[:, :, 0].add(gates[:, :, 0, None, None] * init), inputs, initial)
    return jax.lax.associative_scan(_scan_op, (gates, first), axis=2)[1]


def associative_block(carry, xs, *, chunk_size, refresh, residual, max_grad_norm):
    """xla.py's `_block` before the change (commit 5d1f02a): associative scans over the chunk axis."""
    w, s, wref = carry
    k, v, q, lr, eta, alpha = xs
    B, H, L, D = k.shape
    C = chunk_size
    nc = L // C

    def chunk_loss(w_chunks):
        losses = _token_losses(w_chunks, k.reshape(B, H, nc, C, D), v.reshape(B, H, nc, C, D), residual)
        return jnp.sum(lr.reshape(B, H, nc, C) * losses)

    w_chunks = jax.tree.map(lambda x: jnp.broadcast_to(x[:, :, None], (B, H, nc, *x.shape[2:])), wref)
    g = clamp_norm(jax.grad(chunk_loss)(w_chunks), max_grad_norm)
    s_all = _linear_scan(eta, jax.tree.map(jnp.negative, g), s)
    w_all = _linear_scan(1.0 - alpha, s_all, w)
    w_seq = jax.tree.map(lambda w0, ws: jnp.concatenate([w0[:, :, None], ws], axis=2), w, w_all)
    q_shift = jnp.pad(q, ((0, 0), (0, 0), (1, C - 1), (0, 0))).reshape(B, H, nc + 1, C, D)
    y = memory_apply(w_seq, q_shift, residual).reshape(B, H, (nc + 1) * C, D)[:, :, 1 : L + 1]
    w_end = jax.tree.map(lambda x: x[:, :, -1], w_all)
    s_end = jax.tree.map(lambda x: x[:, :, -1], s_all)
    return (w_end, s_end, w_end if refresh else wref), y


def compiled_step(chunk: int, batch_size: int | None, t_len: int, batch: int, block, *, d_model: int = 256,
                  heads: int = 4, seed: int = 0):
    """The layer's jitted forward + backward, traced with `block` as xla.py's block function."""
    cfg = NeuralMemoryConfig(n_heads=heads, chunk_size=chunk, batch_size=batch_size, implementation="xla")
    graphdef, params = nnx.split(NeuralMemory(d_model, cfg, rngs=nnx.Rngs(seed)), nnx.Param)

    def loss(p, x, ct):
        return jnp.sum(nnx.merge(graphdef, p)(x) * ct)

    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, t_len, d_model), jnp.float32)
    ct = jax.random.normal(kc, (batch, t_len, d_model), jnp.float32)
    saved = xla._block
    xla._block = block
    try:
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, ct).compile()
    finally:
        xla._block = saved
    return compiled, (params, x, ct)


def measure(case, reps: int, *, d_model: int = 256, heads: int = 4) -> dict:
    """Both forms at one (chunk_size, batch_size, T, batch): medians, their ratio, and how far apart their loss
    and gradients are (relative to the largest gradient entry of each leaf)."""
    chunk, batch_size, t_len, batch = case
    forms = {"sequential": xla._block, "associative": associative_block}
    steps = {name: compiled_step(chunk, batch_size, t_len, batch, block, d_model=d_model, heads=heads)
             for name, block in forms.items()}
    outs = {name: jax.block_until_ready(fn(*args)) for name, (fn, args) in steps.items()}  # warmup
    (v_new, g_new), (v_old, g_old) = outs["sequential"], outs["associative"]
    grad_diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)))
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, (fn, args) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"chunk_size": chunk, "batch_size": batch_size, "T": t_len, "batch": batch,
            "median_s": med, "times_s": times, "ratio_new_over_old": med["sequential"] / med["associative"],
            "loss_rel_diff": float(abs(v_new - v_old) / abs(v_old)), "grad_max_rel_diff": grad_diff}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="the first case only, 3 reps (smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gate = LoadGate()
    cases, reps = (CASES[:1], 3) if args.quick else (CASES, args.reps)
    load_before = os.getloadavg()
    results = [measure(c, reps) for c in cases]
    load_after = os.getloadavg()
    worst = max(r["ratio_new_over_old"] for r in results)
    report = {"benchmark": "titans_scan_forms", "config": {**platform_info(), "reps": reps, "d_model": 256,
                                                          "heads": 4, "expansion": 4, "dtype": "float32"},
              "load_average_before": load_before, "load_average_after": load_after, "results": results,
              "worst_ratio": worst, "target": {"ratio_at_most": TOLERANCE, "met": worst <= TOLERANCE}}
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
