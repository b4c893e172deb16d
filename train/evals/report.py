"""`effarch report DIR`: markdown tables of the evaluation results under a run or sweep directory.

Every RUN_DIR/eval/<task>.json under DIR (archived runs under `previous/` excluded) becomes a row of its task's
table: the run directory (relative to DIR), the checkpoint step and the result's summary numbers. A sweep directory
(with sweep.json) first gets the sweep's best-of table.
"""

import json
from pathlib import Path

from effarch.train.config import ConfigError
from effarch.train.evals.sweep_results import best_table


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def results_under(directory: Path) -> dict[str, list[tuple[str, dict]]]:
    """{task: [(run dir relative to `directory`, result), ...]} sorted by run dir."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(directory.rglob("eval/*.json")):
        if "previous" in path.relative_to(directory).parts:
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(result, dict) or "task" not in result or "summary" not in result:
            continue
        run = path.parent.parent.relative_to(directory).as_posix()
        if isinstance(result.get("kv_policy"), dict):  # one row per policy: `effarch eval ... --kv-policy`
            run += f" [kv {result['kv_policy'].get('describe', '')}]"
        out.setdefault(result["task"], []).append((run, result))
    return out


def task_table(rows: list[tuple[str, dict]]) -> str:
    keys: list[str] = []
    for _, result in rows:
        keys += [k for k in result["summary"] if k not in keys]
    head = ["run", "step", *keys]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for run, result in rows:
        cells = [run, _cell(result.get("checkpoint_step")), *(_cell(result["summary"].get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(directory: str | Path) -> str:
    """The markdown report of `directory`; ConfigError when it is missing or holds no results."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"report: {str(directory)!r} is not a directory")
    parts = []
    summary_path = directory / "sweep.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        parts.append(f"## sweep: best of {', '.join(summary['over']) or 'each run'} by {summary['metric']} "
                     f"({summary['mode']})\n\n{best_table(summary)}")
    for task, rows in results_under(directory).items():
        parts.append(f"## {task}\n\n{task_table(rows)}")
    if not parts:
        raise ConfigError(f"report: no eval results under {str(directory)!r} (write them with effarch eval RUN_DIR "
                          "TASK or effarch sweep)")
    return "\n\n".join(parts)
