"""The loss and gradients of an LM with one layer of every registered mixer on an 8-device mesh (data x fsdp x tensor
= 2 x 2 x 2, CPU devices in one subprocess for all mixers) equal those on one device, layer by layer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effarch.arches.registry import MIXERS
from tests.helpers.devices import eight_cpu_devices

ROOT = Path(__file__).resolve().parents[2]


def run_script(names: list[str]) -> dict[str, float]:
    env = eight_cpu_devices()
    proc = subprocess.run([sys.executable, "-m", "tests.conformance.mesh_script", *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted([*names, "loss"]), errors
    return errors


def check(names: list[str]) -> None:
    for name, err in run_script(names).items():
        # float32 sums split over devices: a few ulps of reordering.
        assert err <= 1e-5, f"{name}: 8 devices vs 1, relative error {err:.2e}"


def _names(slow: bool) -> list[str]:
    return [n for n in sorted(MIXERS) if "mesh" not in MIXERS[n].skip and ("mesh" in MIXERS[n].slow) == slow]


# ~50 s on 2 CPU cores: slow; the default suite's sharding guard is tests/train/test_train.py's 2-device step.
@pytest.mark.slow
def test_train_step_on_8_devices_equals_one_device():
    check(_names(slow=False))


@pytest.mark.slow
def test_train_step_on_8_devices_equals_one_device_slow_mixers():
    names = _names(slow=True)
    if not names:
        pytest.skip("no mixer defers its mesh check")
    check(names)
