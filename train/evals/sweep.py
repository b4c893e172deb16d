"""`effarch sweep SWEEP.yaml`: train every config of a grid in parallel processes, evaluate each run, keep the best.

Three parts, one file each:
- train/evals/sweep_spec.py: the sweep file (runs, grid, evals, select) read, checked and expanded into one spec per
  run, SWEEP_DIR/<run>-<key>=<value>-...;
- train/evals/sweep_runner.py: the runs (worker processes or in-process), their markers (a finished run is skipped
  on a rerun, an interrupted one resumes) and the signal handling;
- train/evals/sweep_results.py: the rows, the best per group, and SWEEP_DIR/sweep.json, table.md and the MQAR
  accuracy-vs-state PNG.
This module is the command line and the worker's entry point (`python -m effarch.train.evals.sweep --worker RUN_DIR`).
"""

import argparse
import os
import sys
from pathlib import Path

from effarch.train.config import ConfigError
from effarch.train.evals.sweep_results import best_table, collect, finish, runs_table, state_figure
from effarch.train.evals.sweep_runner import STOPPED, is_finished, run_all, work
from effarch.train.evals.sweep_spec import Sweep, load_sweep

__all__ = ["STOPPED", "Sweep", "best_table", "collect", "finish", "is_finished", "load_sweep", "main", "run_all",
           "runs_table", "state_figure", "work"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def main(argv: list[str]) -> int:
    """`effarch sweep`: 0 when every run finished, 1 when some failed (their logs are named)."""
    p = _Parser(prog="effarch sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep_file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (default: the CPU count)")
    p.add_argument("--sweep-dir", default=None, help="overrides the file's sweep_dir")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="only these named runs of the file")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their overrides, run nothing")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: write sweep.json, table.md and the PNG from the runs finished so far")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    sweep = load_sweep(args.sweep_file, args.sweep_dir)
    specs = sweep.runs_to_do()
    if args.only:
        unknown = sorted(set(args.only) - set(sweep.runs))
        if unknown:
            raise ConfigError(f"--only: unknown run(s) {unknown}; the sweep has {sorted(sweep.runs)}")
        specs = [s for s in specs if s["run"] in args.only]
    if args.dry_run:
        for s in specs:
            print(f"{s['name']}: {' '.join(Path(c).name for c in s['configs'])} {' '.join(s['overrides'][1:-1])}")
        return 0
    if args.collect:
        status = {s["name"]: "skipped" if is_finished(s) else "not started" for s in specs}
    else:
        print(f"sweep: {len(specs)} runs in {sweep.sweep_dir}, {args.jobs} at a time", file=sys.stderr)
        status = run_all(specs, args.jobs, log=lambda s: print(s, file=sys.stderr))
    summary = finish(sweep, specs, status, log=lambda s: print(s, file=sys.stderr))
    print(summary["table"])
    print(f"sweep: results in {sweep.sweep_dir}/{', '.join(summary['files'])}", file=sys.stderr)
    if args.collect:
        return 0
    return 0 if all(v in ("done", "skipped") for v in status.values()) else 1  # failed, interrupted or not started


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"] and len(sys.argv) == 3:
        sys.exit(work(Path(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))

