"""Issue #23's evidence: each KV policy's accuracy (passkey, S-NIAH) or perplexity (a byte LM) against the KV bytes it
reads per decoded token, on models trained here with full attention at 512-1k tokens and evaluated at 1k-8k.

Cells (task, length, policy, budget). Accuracy cells call the eval tasks' own code (train/evals/passkey.py and
niah.py `evaluate`) with `kv_prefill="context"`: the haystack is prefilled densely, then the question and the
answer are decoded one token at a time through the policy, teacher-forced (train/evals/common.py
`decoded_outputs`); exact match of the whole answer. Perplexity cells cut the byte LM's held-out bytes into windows
of the length (train/evals/perplexity.py `heldout_text`), prefill each window up to its last `--lm-score` bytes and
decode those through the policy, scoring only them. KV bytes per decoded token: the measured KV tokens a query head
read per decode step and layer (`KV_READS`, what `effarch eval --kv-policy` reports) times the K and V bytes of one
token over the policy layers; the full cache (the parallel forward, the ceiling) reads the whole context: length x
those bytes.

Policies (`--policies`; layers/kv_policies/, docs/generation.md): window, quest, retrieval (exact), retrieval_ivf
(`index=ivf`), tokenselect, tidal (`select_layer=0`: these models have 2 and 4 layers), recycled, longheads
(`train_len` = the run's data.seq_len, the length it was trained at), razor (`--razor-heads TASK=PATH`, a heads file
of `effarch heads` per task) and duo (`--duo-run`: the passkey model with trained gates, full=0.5; passkey only), each
with `budget=N` for N in `--budgets`. A policy without what it needs for a task (razor without a heads file, duo
off passkey) is left out of that task, and said so in the JSON's "skipped". act is left out: without a calibration
(`effarch act-search`) it reads the full cache.

Results: a JSON (`cells`: "task|length|policy|budget" -> {accuracy or perplexity / loss, kv_tokens_per_step,
kv_bytes_per_token, wall_s}) written after every cell, so that `--resume` skips the cells done, and a PNG beside it
(one panel per task and length: x = KV bytes read per decoded token, log; one line per policy over its budgets; the
full cache as a horizontal line). The load average before and after is recorded.

Run:      .venv/bin/python benchmarks/kv_policy_evidence.py --passkey RUN --duo-run RUN --niah RUN --lm RUN \\
              --razor-heads passkey=RUN/heads/passkey.json niah=RUN2/heads/niah.json \\
              [--lengths 2048 8192] [--budgets 64 256 1024] [--trials 4] [--out FILE] [--resume]
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from effarch.layers.kv_policies import make_policy
from effarch.train.evals import niah, passkey, perplexity
from effarch.train.evals.common import KV_READS, labelled_outputs
from effarch.train.generate import restore_run

POLICIES = ("window", "quest", "retrieval", "retrieval_ivf", "tokenselect", "tidal", "recycled", "longheads", "razor",
            "duo")
TASKS = ("passkey", "lm", "niah")
DEPTHS = (0.0, 0.33, 0.67, 1.0)


def policy_args(policy: str, budget: int, task: str, cfg, args) -> list[str] | None:
    """make_policy's (name, options) for a cell, or None when the policy cannot run on this task."""
    opts = [f"budget={budget}"]
    if policy == "retrieval_ivf":
        return ["retrieval", *opts, "index=ivf"]
    if policy == "tidal":
        return ["tidal", *opts, "select_layer=0"]
    if policy == "longheads":
        return ["longheads", *opts, f"train_len={cfg.data.seq_len}"]
    if policy == "razor":
        heads = args.razor_heads.get(task)
        return None if heads is None else ["razor", *opts, f"heads={heads}"]
    if policy == "duo":
        return ["duo", *opts, "full=0.5"] if task == "passkey" and args.duo_run else None
    return [policy, *opts]


def kv_bytes_per_token(model) -> int:
    """K and V bytes of one token over every layer with a KV cache (what a policy reads a fraction of)."""
    layers = model.set_kv_policy(make_policy("window", ["budget=16"]))
    model.set_kv_policy(None)
    return sum(int(model.blocks[i].mixer.state_size(1)) for i in layers)


def score(task: str, model, cfg, length: int, args) -> dict:
    """The task's metric at one length for the model as it is (with or without a KV policy)."""
    if task in ("passkey", "niah"):
        module = passkey if task == "passkey" else niah
        batch = max(1, args.rows_per_8k * 8192 // length)
        trials = args.trials_at.get(length, args.trials)
        out = module.evaluate(model, [length], list(args.depths), trials=trials, seed=args.seed,
                              batch_size=batch, kv_prefill="context")
        (by_len,) = out["results"].values()
        r = by_len[str(length)]
        return {"accuracy": r["accuracy"], "digit_accuracy": r["digit_accuracy"], "by_depth": r["by_depth"]}
    x, y = lm_windows(cfg, length, args)
    _, ce = labelled_outputs(model, x, y, batch_size=1)
    loss = float(ce.mean())
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2), "tokens": len(ce)}


_WINDOWS: dict = {}


def lm_windows(cfg, length: int, args) -> tuple[np.ndarray, np.ndarray]:
    """The first `--lm-windows` held-out windows of `length` bytes, labelled on their last `--lm-score` bytes."""
    key = (cfg.train.run_dir, length)
    if key not in _WINDOWS:
        x, y = perplexity.heldout_text(cfg).windows(length)
        if len(x) < args.lm_windows:
            raise SystemExit(f"kv_policy_evidence: the byte LM's held-out text has {len(x)} windows of {length}, "
                             f"fewer than --lm-windows {args.lm_windows}")
        x, y = x[: args.lm_windows], y[: args.lm_windows].copy()
        y[:, : length - args.lm_score] = -100
        _WINDOWS[key] = (x, y)
    return _WINDOWS[key]


def cell_key(task: str, length: int, policy: str, budget) -> str:
    return f"{task}|{length}|{policy}|{budget}"


def run_cells(args, report: dict, out: Path | None) -> None:
    runs = {"passkey": args.passkey, "niah": args.niah, "lm": args.lm}
    for task in args.tasks:
        if not runs[task]:
            report["skipped"][task] = "no run given"
            continue
        cfg, model, _ = restore_run(runs[task])
        duo = restore_run(args.duo_run)[1] if task == "passkey" and args.duo_run else None
        per_token = kv_bytes_per_token(model)
        for length in args.lengths:
            budgets = args.budgets_at.get(length, args.budgets)
            cells = [("full", None)] + [(p, b) for b in budgets for p in args.policies]
            for policy, budget in cells:
                key = cell_key(task, length, policy, budget)
                if key in report["cells"]:
                    continue
                spec = None if policy == "full" else policy_args(policy, budget, task, cfg, args)
                if policy != "full" and spec is None:
                    report["skipped"][f"{task}|{policy}"] = "needs a heads file (--razor-heads)" \
                        if policy == "razor" else "needs the duo-gated passkey run (--duo-run); passkey only"
                    continue
                m = duo if policy == "duo" else model
                if spec is not None:
                    m.set_kv_policy(make_policy(spec[0], spec[1:]))
                KV_READS.reset()
                start = time.perf_counter()
                try:
                    record = score(task, m, cfg, length, args)
                finally:
                    m.set_kv_policy(None)
                record["wall_s"] = round(time.perf_counter() - start, 1)
                tokens = float(length) if policy == "full" else KV_READS.per_step()
                record.update(policy=" ".join(spec) if spec else "full cache", kv_tokens_per_step=tokens,
                              kv_bytes_per_token=tokens * per_token)
                report["cells"][key] = record
                metric = record.get("accuracy", record.get("perplexity"))
                print(f"{key}: {metric:.3f}  KV tokens/step {tokens:.0f}  ({record['wall_s']} s)", flush=True)
                if out is not None:
                    report["load_after"] = os.getloadavg()[0]
                    out.write_text(json.dumps(report, indent=1) + "\n")


def plot(report: dict, path: str) -> None:
    """One panel per (task, length): metric against KV bytes per decoded token (log x), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = sorted({(k.split("|")[0], int(k.split("|")[1])) for k in report["cells"]},
                    key=lambda p: (TASKS.index(p[0]), p[1]))
    if not panels:
        return
    tasks = [t for t in TASKS if any(p[0] == t for p in panels)]
    rows = [[length for t, length in panels if t == task] for task in tasks]  # each task's own lengths
    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(tasks), width, figsize=(4.2 * width, 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j in range(len(rows[i]), width):
            axes[i][j].set_visible(False)
        for j, length in enumerate(rows[i]):
            ax = axes[i][j]
            metric = "perplexity" if task == "lm" else "accuracy"
            cells = {k: r for k, r in report["cells"].items() if k.startswith(f"{task}|{length}|")}
            full = cells.get(cell_key(task, length, "full", None))
            for policy in POLICIES:
                pts = sorted((r["kv_bytes_per_token"], r[metric]) for k, r in cells.items()
                             if k.split("|")[2] == policy)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=policy)
            if full is not None:
                ax.axhline(full[metric], color="k", ls="--", lw=1, label="full cache")
                ax.plot([full["kv_bytes_per_token"]], [full[metric]], "k*")
            if metric == "accuracy":
                ax.set_ylim(-0.03, 1.03)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the decade labels only
            ax.set_title(f"{ {'lm': 'byte LM'}.get(task, task)} at {length}", fontsize=9)
            ax.set_xlabel("KV bytes read per decoded token", fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][len(rows[0]) - 1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_at(items: list[str], flag: str, many: bool) -> dict:
    """["8192=1"] -> {8192: 1}; with many, ["8192=64,256"] -> {8192: [64, 256]}."""
    out = {}
    for item in items:
        length, sep, value = item.partition("=")
        try:
            out[int(length)] = [int(v) for v in value.split(",")] if many else int(value)
        except ValueError:
            raise SystemExit(f"kv_policy_evidence: {flag} wants LENGTH=N{',N' if many else ''}, got {item!r}") from None
        if not sep:
            raise SystemExit(f"kv_policy_evidence: {flag} wants LENGTH=N, got {item!r}")
    return out


def parse_heads(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or task not in ("passkey", "niah") or not Path(path).is_file():
            raise SystemExit(f"kv_policy_evidence: --razor-heads wants TASK=PATH (task passkey or niah, an existing "
                             f"file), got {item!r}")
        out[task] = path
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passkey", default=None, help="passkey run (full attention)")
    p.add_argument("--duo-run", default=None, help="the passkey run with trained DuoAttention gates")
    p.add_argument("--niah", default=None, help="S-NIAH run (full attention)")
    p.add_argument("--lm", default=None, help="byte-LM run (full attention)")
    p.add_argument("--razor-heads", nargs="*", default=[], metavar="TASK=PATH")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    p.add_argument("--trials", type=int, default=4, help="needles per (length, depth)")
    p.add_argument("--trials-at", nargs="*", default=[], metavar="LENGTH=N",
                   help="another trial count at a length (the dense prefill of long rows dominates the time)")
    p.add_argument("--budgets-at", nargs="*", default=[], metavar="LENGTH=N,N",
                   help="other budgets at a length")
    p.add_argument("--rows-per-8k", type=int, default=2, help="rows per batch at 8k tokens (more at shorter lengths)")
    p.add_argument("--lm-windows", type=int, default=2, help="held-out windows per length (byte LM)")
    p.add_argument("--lm-score", type=int, default=256, help="bytes scored (decoded) at the end of each window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (a PNG is written beside it)")
    p.add_argument("--resume", action="store_true", help="keep the cells of an existing --out and skip them")
    args = p.parse_args(argv)
    args.razor_heads = parse_heads(args.razor_heads)
    args.trials_at = parse_at(args.trials_at, "--trials-at", many=False)
    args.budgets_at = parse_at(args.budgets_at, "--budgets-at", many=True)
    out = Path(args.out) if args.out else None
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "resume")}, "cells": {},
              "skipped": {}, "load_before": os.getloadavg()[0]}
    if args.resume and out is not None and out.is_file():
        report["cells"] = json.loads(out.read_text())["cells"]
    run_cells(args, report, out)
    report["load_after"] = os.getloadavg()[0]
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
        plot(report, str(out.with_suffix(".png")))
    return report


if __name__ == "__main__":
    main()
