"""MQAR recall against decode-state size: Zoology's trade-off table for BASED and softmax attention.

Paper claim under test: BASED (arXiv 2402.18668, Fig. 2) reaches near-perfect multi-query associative recall with a
fixed-size recurrent state, while attention pays with a KV cache that grows with the sequence; our target is
BASED at d_model 128, feature dim 16 reaching >= 0.99 test accuracy at (seq 256, 16 kv pairs).

Each model is Zoology's 2-layer MQAR model (layer 0 = Zoology's BaseConv, kernel 3; layer 1 = the mixer under test;
no MLP, vocab 8192): `configs/mqar/based.yaml` (1-head BASED, F 16) and `configs/mqar/zoology_attention.yaml`
(1-head softmax attention, no RoPE), at every d_model asked for. Every model trains on the same data
(`--train-examples` at (`--seq-len`, `--kv-pairs`)) in-process with `train_and_evaluate`, in a temporary run directory,
until the test accuracy reaches `--target` or `--max-steps` updates (the cosine schedule spans `--max-steps`).

Reported per model: final and best test accuracy, the step at which the target was first reached, steps run, wall
time (data generation and compilation included), parameter count, and the decode-state bytes per sequence after
`--seq-len` tokens (`DecoderLM.state_size`: BASED's Taylor state + conv buffers; attention's KV cache + conv buffers).

Run:   .venv/bin/python benchmarks/mqar_recall_vs_state.py [--d-models 64 128] [--mixers based attention]
           [--max-steps 1500] [--lr based=3.2e-3] [--out FILE] [key=value overrides for every run]
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _common import LoadGate, emit
from flax import nnx

from effarch.arches.lm import DecoderLM
from effarch.train.config import load_config
from effarch.train.train import train_and_evaluate

_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mqar"
BASE_CONFIGS = {"based": _CONFIGS / "based.yaml", "attention": _CONFIGS / "zoology_attention.yaml"}
# Zoology sweeps lr in logspace(-3, -1.5, 4) and keeps the best; these are the values that worked here.
DEFAULT_LR = {"based": 3.2e-3, "attention": 3.2e-3}


def state_bytes(cfg, seq_len: int) -> int:
    """Decode-state bytes per sequence after seq_len tokens, from an abstract (unallocated) model."""
    model = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
    return int(model.state_size(seq_len))


def num_params(cfg) -> int:
    model = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
    return int(model.num_params())


def run_one(
    mixer: str,
    d_model: int,
    *,
    seq_len: int,
    kv_pairs: int,
    train_examples: int,
    test_examples: int,
    lr: float,
    max_steps: int,
    batch_size: int,
    eval_every: int,
    target: float,
    overrides: Sequence[str] = (),
) -> dict:
    """Trains one model to the target accuracy or the step cap; returns its row of the table."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg = load_config(
            [BASE_CONFIGS[mixer]],
            [
                f"model.d_model={d_model}",
                f"data.mqar.train_segments=[[{seq_len}, {kv_pairs}, {train_examples}]]",
                f"data.mqar.test_segments=[[{seq_len}, {kv_pairs}, {test_examples}]]",
                f"optim.lr={lr}",
                f"train.steps={max_steps}",
                f"train.batch_size={batch_size}",
                f"train.eval_every={eval_every}",
                f"train.stop_at_accuracy={target}",
                f"train.checkpoint_every={max_steps}",
                "train.async_checkpoint=false",
                "train.progress=false",
                f"train.run_dir={tmp}/run",
                *overrides,
            ],
        )
        result = train_and_evaluate(cfg)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    reached = [step for step, acc in evals if acc >= target]
    return {
        "mixer": mixer,
        "d_model": d_model,
        "mixers": list(cfg.model.mixers),
        "state_bytes": state_bytes(cfg, seq_len),
        "num_params": num_params(cfg),
        "lr": lr,
        "test_accuracy": result.eval_metrics.get("eval/accuracy"),
        "best_test_accuracy": max((acc for _, acc in evals), default=None),
        "reached_target": bool(reached),
        "steps_to_target": reached[0] if reached else None,
        "steps": result.step,
        "stopped_by": result.stopped_by,
        "wall_s": wall,
        "eval_curve": evals,
    }


def run(
    mixers: Sequence[str] = ("based", "attention"),
    d_models: Sequence[int] = (64, 128),
    *,
    seq_len: int = 256,
    kv_pairs: int = 16,
    train_examples: int = 20_000,
    test_examples: int = 1_000,
    lrs: dict[str, float] | None = None,
    max_steps: int = 1500,
    batch_size: int = 64,
    eval_every: int = 50,
    target: float = 0.99,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> dict:
    """Runs every (mixer, d_model) and returns the JSON-ready report."""
    lrs = {**DEFAULT_LR, **(lrs or {})}
    rows = []
    for mixer in mixers:
        for d_model in d_models:
            row = run_one(
                mixer,
                d_model,
                seq_len=seq_len,
                kv_pairs=kv_pairs,
                train_examples=train_examples,
                test_examples=test_examples,
                lr=lrs[mixer],
                max_steps=max_steps,
                batch_size=batch_size,
                eval_every=eval_every,
                target=target,
                overrides=overrides,
            )
            rows.append(row)
            if log is not None:
                log(f"{mixer:9s} d_model={d_model:4d} state {row['state_bytes']:>9,d} B  "
                    f"acc {row['test_accuracy']:.4f} (best {row['best_test_accuracy']:.4f}) "
                    f"after {row['steps']} steps, {row['wall_s']:.0f} s")
    return {
        "benchmark": "mqar_recall_vs_state",
        "config": {
            "seq_len": seq_len,
            "num_kv_pairs": kv_pairs,
            "train_examples": train_examples,
            "test_examples": test_examples,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "eval_every": eval_every,
            "target_accuracy": target,
            "lrs": {m: lrs[m] for m in mixers},
            "base_configs": {m: str(BASE_CONFIGS[m].relative_to(_CONFIGS.parents[1])) for m in mixers},
            "overrides": list(overrides),
        },
        "results": rows,
    }


def _parse_lr(text: str) -> tuple[str, float]:
    mixer, _, value = text.partition("=")
    if mixer not in BASE_CONFIGS or not value:
        raise argparse.ArgumentTypeError(f"expected MIXER=LR with MIXER in {sorted(BASE_CONFIGS)}, got {text!r}")
    return mixer, float(value)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", nargs="+", choices=sorted(BASE_CONFIGS), default=["based", "attention"])
    p.add_argument("--d-models", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--kv-pairs", type=int, default=16)
    p.add_argument("--train-examples", type=int, default=20_000)
    p.add_argument("--test-examples", type=int, default=1_000)
    p.add_argument("--lr", type=_parse_lr, action="append", default=[], help="MIXER=LR, e.g. based=1e-2")
    p.add_argument("--max-steps", type=int, default=1500, help="step cap per model (also the cosine horizon)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--target", type=float, default=0.99, help="stop once the test accuracy reaches this")
    p.add_argument("--out", help="also write the JSON report here")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run, key=value")
    args = p.parse_args(argv)
    gate = LoadGate()
    report = run(
        args.mixers,
        args.d_models,
        seq_len=args.seq_len,
        kv_pairs=args.kv_pairs,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        lrs=dict(args.lr),
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        target=args.target,
        overrides=args.overrides,
        log=lambda line: print(line, file=sys.stderr),
    )
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    main()
