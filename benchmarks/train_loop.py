"""Steps/s of the real training step with and without the per-step host round trip, and with and without prefetch.

Each variant runs the compiled step of `effarch.train.train.Trainer` (`train_step_checked`: the update plus the
device-side NaN/inf record) on the config's real data stream, from the same initial parameters over the same steps,
so all variants must log identical losses (checked: `losses_identical`). They differ only in the host side:

- `sync`: the loop without prefetch or deferred readback. Make the batch, put it on the device, run the step, then
  read every metric back (`float()`) and check it for NaN: the host waits for each step before it can start on the
  next one.
- `sync_prefetch`: the same, with the batches made and put on the device ahead by `train/prefetch.py` (depth 2).
- `deferred`: metrics and the NaN/inf record read back every `--log-every` steps only; the host dispatches step s+1
  while step s runs (waiting, without a copy, for step s-1: at most two steps in flight), batches made in the loop.
- `deferred_prefetch`: what `train_and_evaluate` runs by default (`train.prefetch: 2`).

Time is wall time of `--steps` steps after a warmup run that compiles everything, ended by waiting for the last
step's parameters; `steps_per_s` is the median over `--repeats`, with the variants interleaved within each repeat so
that load changes hit them alike. `speedup_vs_sync` is each variant's median steps/s over sync's, in the same run.
Models: `tiny` is the MQAR model shrunk by configs/overlays/tiny.yaml (d_model 32, batch 8 x 32 tokens: the host
share of a step is large); `small` is configs/mqar/zoology_attention.yaml as shipped (d_model 64, vocab 8192,
batch 64 x 64 tokens, the model of benchmarks/mqar_loop.py).

    .venv/bin/python benchmarks/train_loop.py [--models tiny small] [--steps 200 60] [--repeats 5] [--out FILE]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from _common import LoadGate, emit

from effarch.train.config import load_config
from effarch.train.data import build_data
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.health import raise_if_diverged
from effarch.train.prefetch import Prefetcher
from effarch.train.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ["configs/mqar/zoology_attention.yaml", "configs/overlays/tiny.yaml"],
    "small": ["configs/mqar/zoology_attention.yaml"],
}
# name: (per-step readback, prefetch depth)
VARIANTS = {"sync": (True, 0), "sync_prefetch": (True, 2), "deferred": (False, 0), "deferred_prefetch": (False, 2)}


def run_steps(trainer: Trainer, stream, steps: int, *, sync: bool, prefetch: int, log_every: int):
    """(seconds for `steps` steps from fresh parameters, {step: loss} at the steps the variant reads back)."""
    params, opt_state, _ = trainer.init_state(trainer.cfg.train.seed)
    health = trainer.init_health(0)
    jax.block_until_ready((params, opt_state, health))
    losses, previous = {}, None

    def device_batch(s):
        return trainer.global_batch(*stream.batch(s))

    start = time.perf_counter()
    with Prefetcher(device_batch, start=0, stop=steps, depth=prefetch) as batches:
        for step in range(steps):
            params, opt_state, health, m = trainer.train_step_checked(params, opt_state, health, *batches.get(step))
            if sync:  # the old loop: every metric to the host, checked there
                m = {k: float(v) for k, v in m.items()}
                if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                    raise FloatingPointError(f"loss {m['loss']} at step {step + 1}")
                losses[step + 1] = m["loss"]
                continue
            if previous is not None:
                jax.block_until_ready(previous)
            previous = m["loss"]
            if (step + 1) % log_every == 0 or step + 1 == steps:
                raise_if_diverged(health, last_good_step=None, directory="(benchmark)")
                losses[step + 1] = float(m["loss"])
    jax.block_until_ready(params)
    return time.perf_counter() - start, losses


def bench_model(name: str, steps: int, repeats: int, log_every: int, overrides: list[str]) -> dict:
    cfg = load_config([ROOT / p for p in MODELS[name]], ["train.progress=false", *overrides])
    stream, evals = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    # as train_and_evaluate builds it: logits only at the (at most this many per example) labelled positions
    most_labels = max(int((s.labels != IGNORE_LABEL).sum(1).max()) for s in [stream, *evals])
    trainer = Trainer(cfg, labels_per_example=most_labels)
    compile_start = time.perf_counter()
    run_steps(trainer, stream, 3, sync=False, prefetch=0, log_every=1)  # compiles init, step and readbacks
    compile_s = time.perf_counter() - compile_start
    times = {v: [] for v in VARIANTS}
    losses = {}
    for _ in range(repeats):
        for variant, (sync, prefetch) in VARIANTS.items():
            seconds, losses[variant] = run_steps(trainer, stream, steps, sync=sync, prefetch=prefetch,
                                                 log_every=log_every)
            times[variant].append(seconds)
            print(f"train_loop: {name} {variant}: {steps / seconds:.1f} steps/s", file=sys.stderr, flush=True)
    # every variant reads back at least the log steps; there they must agree exactly
    common = sorted(set.intersection(*(set(v) for v in losses.values())))
    identical = all(losses[v][s] == losses["sync"][s] for v in VARIANTS for s in common)
    results = {}
    for variant, ts in times.items():
        median = statistics.median(ts)
        # best: the least-disturbed repeat on a shared machine (the median is the number to quote)
        results[variant] = {"times_s": ts, "median_s": median, "steps_per_s": steps / median,
                            "best_steps_per_s": steps / min(ts)}
    for variant in VARIANTS:
        results[variant]["speedup_vs_sync"] = results[variant]["steps_per_s"] / results["sync"]["steps_per_s"]
    m = cfg.model
    return {
        "config": MODELS[name], "overrides": overrides, "steps": steps, "repeats": repeats, "log_every": log_every,
        "d_model": m.d_model, "n_layers": m.n_layers, "vocab_size": m.vocab_size,
        "batch": [cfg.train.batch_size, int(stream.inputs.shape[1])], "compile_s": compile_s,
        "losses_identical": identical, "compared_steps": common, "final_loss": losses["sync"][steps],
        "results": results,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", nargs="+", type=int, default=[200, 60], help="timed steps per model (one per model, "
                   "or one for all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--log-every", type=int, default=50, help="readback interval of the deferred variants")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides for every model, key=value")
    args = p.parse_args(argv)
    gate = LoadGate()
    steps = args.steps if len(args.steps) == len(args.models) else args.steps[:1] * len(args.models)
    if len(args.steps) not in (1, len(args.models)) or min(steps) < 1 or args.repeats < 1 or args.log_every < 1:
        p.error("--steps: one positive count, or one per model; --repeats and --log-every >= 1")
    report = {
        "benchmark": "train_loop",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "load_avg_1m_before": os.getloadavg()[0],
        "models": {name: bench_model(name, n, args.repeats, args.log_every, args.overrides)
                   for name, n in zip(args.models, steps)},
    }
    report["load_avg_1m_after"] = os.getloadavg()[0]  # the machine is shared: read the ratios, not single times
    return emit(gate.stamp(report), args.out)


if __name__ == "__main__":
    sys.exit(0 if all(r["losses_identical"] for r in main()["models"].values()) else 1)
