"""ACT's head search (Yu et al., arXiv 2406.15765, §4.2; the official GATECH-EIC/ACT calibration script):
`effarch act-search RUN_DIR --out act.json` finds the (layer, query head) pairs whose attention calibration helps,
and writes the JSON that `--kv-policy act calibration=act.json` reads (layers/kv_policies/act.py).

ACT applies the calibration to one head at a time on a calibration set and keeps the heads that improve accuracy.
Here the calibration set is `--calibration-batches` batches of the run's own training data, read through the decode
path as `effarch eval --kv-policy` reads them (train/evals/common.py `decoded_outputs`: the context up to the first
labelled position is prefilled, every later token is one decode step, teacher-forced): each head is scored by the
mean cross entropy of the labelled tokens with that head alone calibrated, and is kept when it lowers the loss of the
uncalibrated model (the full cache) by more than `--min-gain` nats (ACT keeps heads by accuracy; the loss is the finer
signal on small calibration sets). The JSON holds the kept heads, beta, tau and every head's loss and accuracy.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from effarch.train.config import ConfigError

USAGE = """usage: effarch act-search RUN_DIR --out act.json [--calibration-batches N] [--batch-size N] [--beta B]
                          [--tau T] [--min-gain NATS]"""


class SearchError(ConfigError):
    """The search cannot run as asked; the message names what was wrong."""


def calibrated_loss(model, batches, policy, batch_size: int) -> tuple[float, float]:
    """(mean cross entropy, accuracy) of the labelled tokens of `batches` decoded through `policy`."""
    from effarch.train.evals.common import decoded_outputs

    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    model.set_kv_policy(policy)
    try:
        pred, ce = decoded_outputs(model, x, y, batch_size)  # one compiled step serves every batch
    finally:
        model.set_kv_policy(None)
    return float(ce.mean()), float((pred == y[np.nonzero(y != -100)]).mean())


def search(run_dir: str | Path, out: str | Path, *, calibration_batches: int = 2, batch_size: int | None = None,
           beta: float = 0.4, tau: float = 0.1, min_gain: float = 0.0, log=print) -> dict:
    """Scores every (attention layer, query head) of run `run_dir` and writes the calibration to `out`."""
    from effarch.layers.kv_policies import ACTPolicy, PolicyError
    from effarch.train.data import build_data
    from effarch.train.generate import load_run_config, restore_run

    try:
        ACTPolicy(beta=beta, tau=tau)
    except PolicyError as e:
        raise SearchError(str(e).replace("kv policy act: ", "act-search: ")) from None
    cfg = load_run_config(run_dir)
    batch_size = batch_size or min(cfg.train.batch_size, 8)
    try:
        stream = build_data(cfg.data, cfg.model.vocab_size, batch_size)[0]
    except ValueError as e:
        raise SearchError(f"calibration data: {e}") from None
    batches = [stream.batch(s) for s in range(calibration_batches)]
    cfg, model, step = restore_run(run_dir)
    try:
        layers = model.set_kv_policy(ACTPolicy(beta=beta, tau=tau))
    except ValueError as e:
        raise SearchError(f"act-search: {e}") from None
    model.set_kv_policy(None)
    n_heads = {i: model.blocks[i].mixer.config.n_heads for i in layers}
    base_loss, base_acc = calibrated_loss(model, batches, ACTPolicy(beta=beta, tau=tau), batch_size)
    log(f"act-search: full cache: loss {base_loss:.4f}, accuracy {base_acc:.4f}")
    per_head, kept = {}, []
    for layer in layers:
        for head in range(n_heads[layer]):
            loss, acc = calibrated_loss(model, batches, ACTPolicy(heads=f"{layer}:{head}", beta=beta, tau=tau),
                                        batch_size)
            per_head[f"{layer}:{head}"] = {"loss": loss, "accuracy": acc}
            if base_loss - loss > min_gain:
                kept.append([layer, head])
            log(f"act-search: layer {layer} head {head}: loss {loss:.4f} ({loss - base_loss:+.4f}), accuracy "
                f"{acc:.4f}{' (kept)' if kept and kept[-1] == [layer, head] else ''}")
    result = {"heads": kept, "beta": beta, "tau": tau, "min_gain": min_gain,
              "baseline": {"loss": base_loss, "accuracy": base_acc}, "per_head": per_head,
              "source_run": str(Path(run_dir)), "checkpoint_step": step, "calibration_batches": calibration_batches,
              "batch_size": batch_size}
    if kept:
        both = calibrated_loss(model, batches, ACTPolicy(heads=",".join(f"{a}:{b}" for a, b in kept), beta=beta,
                                                         tau=tau), batch_size)
        result["kept_together"] = {"loss": both[0], "accuracy": both[1]}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str], log=print) -> dict:
    """`effarch act-search ...`; raises ConfigError (one line) on bad input."""
    from effarch.train.evals.common import positive_int

    p = argparse.ArgumentParser(prog="effarch act-search", usage=USAGE.removeprefix("usage: "),
                                description="Search the heads whose attention calibration (ACT) lowers the loss on "
                                "calibration batches of the run's own data; writes the JSON that --kv-policy act "
                                "calibration=PATH reads.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="the calibration file to write (JSON)")
    p.add_argument("--calibration-batches", type=positive_int, default=2, help="training batches to score on")
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per batch (default min(train, 8))")
    p.add_argument("--beta", type=float, default=0.4, help="scale of the hidden sinks' attention (ACT: 0.4)")
    p.add_argument("--tau", type=float, default=0.1, help="column-mean threshold of a sink (ACT: 0.1)")
    p.add_argument("--min-gain", type=float, default=0.0, help="keep a head when it lowers the loss by more (nats)")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise SearchError(f"act-search: run dir {args.run_dir!r} does not exist")
    return search(args.run_dir, args.out, calibration_batches=args.calibration_batches, batch_size=args.batch_size,
                  beta=args.beta, tau=args.tau, min_gain=args.min_gain, log=log)
