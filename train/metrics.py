"""Metrics sinks: one JSON object per line in metrics.jsonl, TensorBoard event files, and a tqdm progress bar.

A resumed run appends to the same metrics.jsonl. A run that was killed may have left half a line at its end (cut
off on resume, so the next record starts on a line of its own) and records of the steps after its last checkpoint,
which the resumed run takes again. The resume writes `{"event": "resumed", "step": S, ...}` (with the settings that
changed, e.g. `train.steps`, which moves the learning-rate schedule), and `read_metrics` drops every earlier record
of a step after S: readers see each step once, as the run that continued computed it. TensorBoard gets the same
cut through its purge step.
"""

import json
import os
import sys
from pathlib import Path

from tensorboardX import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsWriteFailed(OSError):
    """metrics.jsonl or the TensorBoard events could not be written (a full disk); the message names the path."""


def _cut_partial_line(path: Path) -> int:
    """Truncates `path` after its last newline; the number of bytes cut (a line a killed run did not finish)."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        pos = size
        while pos > 0:  # the last newline, reading backwards in blocks
            start = max(0, pos - 4096)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                end = start + i + 1
                break
            pos = start
        else:
            end = 0
        f.truncate(end)
        return size - end


class MetricsWriter:
    """`resumed`: {"step": S, "changed": {key: [saved, new]}} when the run resumes from a checkpoint at step S."""

    def __init__(self, run_dir: Path, *, total_steps: int, initial_step: int, progress: bool, is_main: bool,
                 resumed: dict | None = None):
        self.is_main = is_main
        self.jsonl = self.tb = self.bar = None
        if not is_main:
            return
        path = Path(run_dir) / METRICS_FILE
        cut = _cut_partial_line(path)
        self.jsonl = open(path, "a")
        if resumed is not None:
            record = {"event": "resumed", **resumed, **({"cut_bytes": cut} if cut else {})}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        # purge_step: TensorBoard hides the earlier events of the steps this run takes again.
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=initial_step + 1 if initial_step else None)
        if progress:
            self.bar = tqdm(total=total_steps, initial=initial_step, file=sys.stderr, dynamic_ncols=True, unit="step")

    def write(self, step: int, metrics: dict) -> None:
        """Appends one record; MetricsWriteFailed when it cannot be written."""
        if not self.is_main:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise MetricsWriteFailed(f"writing {self.jsonl.name} failed ({e.strerror or e})") from None
        if not self._tb_alive():  # its writer thread died (a full disk): adding more would block on its queue
            raise MetricsWriteFailed(f"writing the TensorBoard events in {self.tb.logdir} failed")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def _tb_alive(self) -> bool:
        """False once tensorboardX's writer thread has died (it dies on an OSError and is never restarted)."""
        worker = getattr(getattr(getattr(self.tb, "file_writer", None), "event_writer", None), "_worker", None)
        return worker is None or worker.is_alive()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.is_main:
            self.jsonl.close()
            if self._tb_alive():  # a dead writer thread would never take the close request off its queue
                self.tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing (e.g. a full disk): close what can be closed, report the first error only
            self.close()
        except Exception:  # noqa: BLE001, S110
            pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, one per step in step order: the keys of all records of that step merged
    (train and eval records share a step), a later record winning. A `{"event": "resumed", "step": S}` record drops
    the earlier records of steps after S (the resumed run takes those steps again); a line that is not a JSON object
    (the end of a killed run's file, from before partial lines were cut) is skipped."""
    by_step: dict[int, dict] = {}
    path = Path(run_dir) / METRICS_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec.get("event") == "resumed":
            by_step = {s: r for s, r in by_step.items() if s <= rec["step"]}
        elif "event" not in rec:
            by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]
