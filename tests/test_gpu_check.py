"""scripts/gpu_check.sh fits the device budget: steps in priority order, each recorded as it finishes, none run past
the budget (GPU_CHECK_BUDGET_S), and scripts/gpu_check_record.py's JSON (per step and summary)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_kernel_checks_run_first():
    steps = re.findall(r"^\s*step \"?([\w$]+)", SCRIPT.read_text(), re.M)
    assert steps[:4] == ["install", "env", "kernel_tests", "kernels_T$T"], steps
    assert 'BUDGET=${GPU_CHECK_BUDGET_S:-420}' in SCRIPT.read_text()  # 7 minutes in all


def test_no_time_left_skips_and_records(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET_S": "20"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1  # nothing installed: stop at once, saying so
    install = json.loads((out / "install.json").read_text())
    assert install["skipped"].startswith("no time left") and not install["passed"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["install"] and not summary["all_passed"]


def test_record_reads_pytest_counts_and_keeps_a_summary(tmp_path):
    (tmp_path / "kernel_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t.a" name="ok"/><testcase classname="t.a" name="bad"><failure/></testcase>'
        '<testcase classname="t.a" name="skip"><skipped/></testcase></testsuite></testsuites>')
    record = [sys.executable, str(ROOT / "scripts" / "gpu_check_record.py"), str(tmp_path)]
    subprocess.run([*record, "env", "0", "3", "30", "", "nvidia-smi"], check=True)
    subprocess.run([*record, "kernel_tests", "1", "50", "150", "", "pytest -m gpu"], check=True)
    step = json.loads((tmp_path / "kernel_tests.json").read_text())
    assert step["pytest"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed": ["t.a::bad"]}
    assert not step["passed"] and not step["timed_out"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["env", "kernel_tests"]
    assert not summary["kernels_passed"] and not summary["all_passed"]
    (tmp_path / "kernel_tests.xml").unlink()  # a rerun of the step replaces its record
    subprocess.run([*record, "kernel_tests", "0", "40", "150", "", "pytest -m gpu"], check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kernels_passed"] and summary["all_passed"] and len(summary["steps"]) == 2
    subprocess.run([*record, "kernels_T2048", "124", "90", "90", "", "kernels.py"], check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"][-1]["timed_out"] and summary["kernels_passed"] and not summary["all_passed"]
