"""Records one step of scripts/gpu_check.sh as it finishes: $OUT/<step>.json, and $OUT/summary.json over every step
so far (so a run cut short by its time limit still says what passed). Standard library only (the GPU image).

    python3 scripts/gpu_check_record.py OUT STEP RC WALL_S LIMIT_S SKIPPED COMMAND

A pytest step that wrote $OUT/<step>.xml (--junitxml) also gets its counts and the ids of the failed tests.
"""

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

KERNEL_STEPS = ("kernel_tests",)  # what a default flip needs (pallas_kernels/dispatch.py, KERNEL_EVIDENCE)


def pytest_counts(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}


def main(out: str, step: str, rc: str, wall_s: str, limit_s: str, skipped: str, command: str) -> None:
    out_dir = Path(out)
    rc_i = int(rc)
    record = {"step": step, "command": command, "rc": rc_i, "wall_s": int(wall_s), "limit_s": int(limit_s),
              # timeout(1) exits 124 on its limit, 137 when it had to kill
              "timed_out": rc_i in (124, 137), "skipped": skipped or None, "passed": rc_i == 0 and not skipped,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    xml = out_dir / f"{step}.xml"
    if xml.exists():
        try:
            record["pytest"] = pytest_counts(xml)
        except ET.ParseError as e:  # cut off mid-write
            record["pytest"] = {"unreadable": str(e)}
    (out_dir / f"{step}.json").write_text(json.dumps(record, indent=2) + "\n")
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": []}
    summary["steps"] = [s for s in summary["steps"] if s["step"] != step] + [record]
    steps = {s["step"]: s for s in summary["steps"]}
    summary["kernels_passed"] = all(steps.get(k, {}).get("passed", False) for k in KERNEL_STEPS)
    summary["all_passed"] = all(s["passed"] for s in summary["steps"])
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
