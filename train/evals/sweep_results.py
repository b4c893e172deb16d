"""The results of a sweep: one row per run (grid values, eval summaries, training record), the best row per group,
and the files SWEEP_DIR/sweep.json, table.md and, with an `mqar` eval and matplotlib, mqar_accuracy_vs_state.png
(Zoology's figure: accuracy against decode-state bytes). `effarch report` prints `best_table` of a sweep.json.
Results under a KV policy (`effarch eval RUN_DIR TASK --kv-policy ...`, in the sweep's evals or run by hand after it:
RUN_DIR/eval/<task>.kv-<policy>-<options>.json) are collected too, into table.md's KV-policy tables, one per task: a
row per run and policy with the policy's budget, the task's summary, and the KV tokens and bytes read per decoded
token, after the run's full-cache result of the task.
A rerun that would report as unfinished a run the existing sweep.json has finished (its settings changed, or it
failed) keeps those files and writes sweep.attempt.json, table.attempt.md (and the PNG) beside them.
"""

import json
from pathlib import Path

from effarch.train.evals import plots
from effarch.train.evals.common import eval_dir, read_result, result_name
from effarch.train.evals.sweep_runner import TRAINED, is_finished, read_json
from effarch.train.evals.sweep_spec import Sweep, fmt_value

SUMMARY = "sweep.json"


def collect(sweep: Sweep, specs: list[dict], status: dict[str, str] | None = None) -> dict:
    """Rows of every run (grid values, eval summaries, state bytes) and the best row per group."""
    rows = []
    for spec in specs:
        run_dir = Path(spec["run_dir"])
        trained = read_json(run_dir / TRAINED) or {}
        row = {"name": spec["name"], "run": spec["run"], "grid": spec["grid"],
               "finished": is_finished(spec),
               "status": (status or {}).get(spec["name"]), "step": trained.get("step"),
               "stopped_by": trained.get("stopped_by"), "train_wall_s": trained.get("train_wall_s"), "evals": {}}
        for task, argv in spec["evals"].items():
            res = read_result(run_dir, eval_result_name(task, argv))
            if res is not None:
                row["evals"][task] = res["summary"]
                row.setdefault("model", res["model"])
                if task == "mqar":
                    row["mqar_segments"] = res["results"]
        row["kv"] = kv_results(run_dir)
        row["metric"] = metric_of(row, sweep.metric)
        rows.append(row)
    best = {}
    for row in rows:
        if row["metric"] is None or not row["finished"]:
            continue
        group = (row["run"], *(json.dumps(v) for k, v in row["grid"].items() if k not in sweep.over))
        if group not in best or (row["metric"] > best[group]["metric"] if sweep.mode == "max"
                                 else row["metric"] < best[group]["metric"]):
            best[group] = row
    return {"sweep_file": str(sweep.path), "sweep_dir": str(sweep.sweep_dir), "metric": sweep.metric,
            "mode": sweep.mode, "over": list(sweep.over), "runs": rows, "best": list(best.values())}


def eval_result_name(task: str, argv: list[str]) -> str:
    """The result file's stem that `effarch eval RUN_DIR task *argv` writes: the task, or with --kv-policy NAME
    [OPT=VALUE ...] the task and the policy's tag ("passkey.kv-quest-budget64"; "-prefillprompt" added by
    `--kv-prefill prompt`)."""
    if "--kv-policy" not in argv:
        return task
    from effarch.layers.kv_policies import PolicyError, make_policy

    start = argv.index("--kv-policy") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    try:
        prefill = argv[argv.index("--kv-prefill") + 1] if "--kv-prefill" in argv[:-1] else None
        return result_name(task, make_policy(argv[start], argv[start + 1 : end]), prefill)
    except (PolicyError, IndexError):
        return task  # the eval itself reports the bad policy


def kv_results(run_dir: Path) -> list[dict]:
    """Every KV-policy result of a run (RUN_DIR/eval/<task>.kv-*.json), by file name: task, file, policy, budget,
    summary, tokens and bytes read per decoded token (None where nothing was decoded)."""
    out = []
    for path in sorted(eval_dir(run_dir).glob("*.kv-*.json")):
        res = read_json(path)
        if not isinstance(res, dict) or not isinstance(res.get("kv_policy"), dict) or "summary" not in res:
            continue
        kv = res["kv_policy"]
        out.append({"task": res.get("task"), "file": path.name, "policy": kv.get("describe") or kv.get("name"),
                    "budget": kv.get("budget"), "summary": res["summary"],
                    "tokens_read_per_step": kv.get("tokens_read_per_step"),
                    "kv_bytes_read_per_step": kv.get("kv_bytes_read_per_step")})
    return out


def kv_tables(summary: dict) -> dict[str, str]:
    """{task: markdown}: one row per run and KV policy of the task, after the run's full-cache result of that task
    (the ceiling, when the sweep evaluated it); no entry for a task without KV-policy results."""
    by_task: dict[str, list[tuple]] = {}
    for r in summary["runs"]:
        for task in sorted({kv["task"] for kv in r.get("kv", [])}):
            rows = by_task.setdefault(task, [])
            if task in r["evals"]:
                rows.append((r["name"], "full cache", None, r["evals"][task], None, None))
            rows += [(r["name"], kv["policy"], kv["budget"], kv["summary"], kv["tokens_read_per_step"],
                      kv["kv_bytes_read_per_step"]) for kv in r["kv"] if kv["task"] == task]
    tables = {}
    for task, rows in by_task.items():
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row[3] if k not in keys]
        head = ["run", "policy", "budget", *keys, "KV tokens read / token", "KV bytes read / token"]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, policy, budget, res, tokens, nbytes in rows:
            cells = [name, policy, "—" if budget is None else str(budget), *(_num(res.get(k)) for k in keys),
                     "—" if tokens is None else f"{tokens:.1f}", "—" if nbytes is None else f"{nbytes:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        tables[task] = "\n".join(lines)
    return tables


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v))


def metric_of(row: dict, metric: str | None) -> float | None:
    if metric is None:
        return None
    task, key = metric.split(".", 1)
    value = row["evals"].get(task, {}).get(key)
    return float(value) if value is not None else None


def best_table(summary: dict) -> str:
    """Markdown: the best run of each group, its chosen `over` values, the metric and the MQAR segments."""
    over = summary["over"]
    rows = summary["best"]
    group_keys = [k for k in (rows[0]["grid"] if rows else {}) if k not in over]
    segs = list(rows[0].get("mqar_segments", {})) if rows else []
    head = ["run", *group_keys, *(f"best {k}" for k in over), summary["metric"] or "metric"]
    # The state column is at the longest test length: attention's KV cache grows with it, a recurrent state does not.
    longest = max(segs, key=lambda s: rows[0]["mqar_segments"][s]["seq_len"]) if segs else None
    head += segs + ([f"state bytes at {rows[0]['mqar_segments'][longest]['seq_len']}"] if segs else []) + ["steps"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["run"], *(fmt_value(r["grid"][k]) for k in group_keys), *(fmt_value(r["grid"][k]) for k in over),
                 f"{r['metric']:.4f}"]
        cells += [f"{r['mqar_segments'][s]['accuracy']:.4f}" for s in segs]
        if segs:
            cells.append(f"{r['mqar_segments'][longest]['state_bytes']:,}")
        cells.append(str(r["step"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(summary: dict) -> str:
    lines = ["| run dir | metric | steps | stopped by | train s | finished |", "|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        cells = ["—" if v is None else str(v) for v in (r["step"], r["stopped_by"], r["train_wall_s"])]
        metric = "—" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(f"| {r['name']} | {metric} | {' | '.join(cells)} | "
                     f"{'yes' if r['finished'] else r['status'] or 'no'} |")
    return "\n".join(lines)


def state_figure(summary: dict, path: str) -> None:
    """Zoology's figure from the best rows: accuracy per MQAR segment against decode-state bytes at its length."""
    panels = {}
    over = set(summary["over"])
    for r in summary["best"]:
        label = ",".join(fmt_value(v) for k, v in r["grid"].items() if k not in over) or r["run"]
        for seg, res in r.get("mqar_segments", {}).items():
            title = f"seq {res['seq_len']}, {res['kv_pairs']} kv pairs"
            panels.setdefault(title, {}).setdefault(r["run"], []).append((res["state_bytes"], res["accuracy"], label))
    if not panels:
        raise ValueError("no finished run has an mqar eval to plot")
    plots.accuracy_vs_state(panels, path, title="MQAR accuracy vs decode-state bytes (best of "
                            f"{', '.join(summary['over']) or 'one run'})")


def unfinished_since(previous: dict | None, summary: dict) -> list[str]:
    """Runs finished in an earlier sweep.json (`previous`) that are not finished now (their settings changed, or
    they failed on a rerun): writing `summary` over `previous` would lose their results."""
    if not isinstance(previous, dict) or not isinstance(previous.get("runs"), list):
        return []
    now = {r["name"]: r["finished"] for r in summary["runs"]}
    return sorted(r["name"] for r in previous["runs"]
                  if isinstance(r, dict) and r.get("finished") and now.get(r.get("name")) is False)


def finish(sweep: Sweep, specs: list[dict], status: dict[str, str] | None = None, log=print) -> dict:
    """Writes sweep.json, table.md and the PNG; returns the summary (its "files": the names written).

    The results of an earlier sweep.json are kept when a run finished there is not finished now (a rerun whose
    settings changed, or that failed): this attempt's files then get an `.attempt` infix (sweep.attempt.json, ...).
    """
    summary = collect(sweep, specs, status)
    lost = unfinished_since(read_json(sweep.sweep_dir / SUMMARY), summary)
    infix = ".attempt" if lost else ""
    files = {"json": f"sweep{infix}.json", "table": f"table{infix}.md", "png": f"mqar_accuracy_vs_state{infix}.png"}
    summary["png"] = None
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mqar" in sweep.evals and summary["best"]:
        try:
            state_figure(summary, str(sweep.sweep_dir / files["png"]))
            summary["png"] = files["png"]
        except plots.PlotsUnavailable as e:
            summary["png_skipped"] = str(e)
            log(f"sweep: {e}")
    text = (f"# sweep {sweep.path.name}: best of {', '.join(sweep.over) or 'each run'} by {sweep.metric} "
            f"({sweep.mode})\n\n{best_table(summary)}\n\n## every run\n\n{runs_table(summary)}\n")
    for task, table in kv_tables(summary).items():
        text += f"\n## KV policies: {task} (effarch eval --kv-policy)\n\n{table}\n"
    (sweep.sweep_dir / files["table"]).write_text(text)
    (sweep.sweep_dir / files["json"]).write_text(json.dumps(summary, indent=2) + "\n")
    if lost:
        log(f"sweep: kept {SUMMARY} and table.md of the earlier sweep: {', '.join(lost)} finished there but not "
            f"now (changed settings or a failure); this attempt's results are in {files['json']}, {files['table']}")
    summary["table"] = text
    summary["files"] = [files["json"], files["table"], *([summary["png"]] if summary["png"] else [])]
    return summary
