"""Metrics sinks: one JSON object per line in metrics.jsonl, TensorBoard event files, and a tqdm progress bar."""

import json
import sys
from pathlib import Path

from tensorboardX import SummaryWriter
from tqdm import tqdm


class MetricsWriter:
    def __init__(self, run_dir: Path, *, total_steps: int, initial_step: int, progress: bool, is_main: bool):
        self.is_main = is_main
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if is_main else None
        self.tb = SummaryWriter(str(run_dir / "tb")) if is_main else None
        self.bar = (
            tqdm(total=total_steps, initial=initial_step, file=sys.stderr, dynamic_ncols=True, unit="step")
            if progress and is_main
            else None
        )

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.is_main:
            self.jsonl.close()
            self.tb.close()
