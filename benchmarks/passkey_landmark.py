"""Passkey retrieval of a trained landmark model at 1x to 8x its training length, with and without block retrieval.

Task: train/data/passkey.py (the token-level analogue of the landmark paper's passkey test, specs §7.2). For each
length and depth, `--trials` keys are hidden at that depth; a trial is correct when all 5 answer digits are the
argmax at their labelled positions with the true prefix fed in (teacher forcing). This equals greedy decoding of
the key: if every digit is right given right digits before it, greedy produces exactly these digits.

Paths:
- "full": the parallel forward over the whole input, every token at its true position, no retrieval (the same
  model as trained, run past its training length).
- "topk{k}": block-memory inference (arches/landmark_memory.py): chunks of `--chunk` tokens, completed blocks
  cached, top-k blocks per token and head, with the paper's positional remapping.

Output: JSON (accuracy per path, length and depth) and, with --png, a heatmap per path (matplotlib, optional extra
`plots`).

Run:   .venv/bin/python benchmarks/passkey_landmark.py --run-dir runs/passkey_landmark [--out FILE] [--png FILE]
"""

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import depth_heatmap, emit
from flax import nnx

from effarch.arches.landmark_memory import init_memory, memory_prefill
from effarch.arches.lm import DecoderLM
from effarch.train.data import passkey
from effarch.train.generate import load_model


def full_logits(model: DecoderLM, x: np.ndarray) -> np.ndarray:
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    return np.asarray(fn(params, jnp.asarray(x)))


def memory_logits(model: DecoderLM, x: np.ndarray, chunk: int) -> np.ndarray:
    B, T = x.shape
    L = model.blocks[0].mixer.config.block_len
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, s, t: memory_prefill(nnx.merge(graphdef, p), s, t))
    state = init_memory(model, B, max_blocks=T // (L + 1) + 1, max_chunk=chunk)
    out = []
    for start in range(0, T, chunk):
        state, logits = step(params, state, jnp.asarray(x[:, start : start + chunk]))
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def with_topk(model: DecoderLM, k: int) -> DecoderLM:
    """The same parameters with mem_topk = k in every landmark layer."""
    for block in model.blocks:
        block.mixer.config = dataclasses.replace(block.mixer.config, mem_topk=k)
    return model


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    mask = labels >= 0
    pred = logits.argmax(-1)
    correct = np.all((pred == labels) | ~mask, axis=1)
    return float(np.mean(correct))


def heatmap(report: dict, path: str) -> None:
    depth_heatmap(report, path, depth_label="depth")


def main(argv=None, model: DecoderLM | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="training run directory (its newest checkpoint)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=16, help="keys per (length, depth)")
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--chunk", type=int, default=128, help="tokens per memory_prefill call")
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention (no retrieval) path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    if model is None:
        if not args.run_dir:
            ap.error("--run-dir is required")
        model = load_model(args.run_dir)
    L = model.blocks[0].mixer.config.block_len
    paths = ([] if args.no_full else ["full"]) + [f"topk{k}" for k in args.topk]
    results = {name: {} for name in paths}
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for T in args.lengths:
        depths = np.repeat(np.asarray(args.depths), args.trials)
        x, y, _ = passkey.passkey_batch(rng, len(depths), T, L, depths=depths)
        for name in paths:
            if name == "full":
                logits = full_logits(model, x)
            else:
                logits = memory_logits(with_topk(model, int(name[4:])), x, args.chunk)
            by_depth = {}
            for d in args.depths:
                rows = depths == d
                by_depth[str(d)] = accuracy(logits[rows], y[rows])
            results[name][str(T)] = {"accuracy": accuracy(logits, y), "by_depth": by_depth}
            print(f"{name} T={T}: {results[name][str(T)]['accuracy']:.3f}", file=sys.stderr)
    report = {
        "config": {"run_dir": args.run_dir, "lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                   "topk": args.topk, "chunk": args.chunk, "block_len": L, "seed": args.seed,
                   "wall_s": round(time.perf_counter() - start, 1)},
        "results": results,
    }
    if args.png:
        heatmap(report, args.png)
    return emit(report, args.out)


if __name__ == "__main__":
    main()
