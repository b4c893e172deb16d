"""The sharded 4-device training step `effarch train` runs compiles for a TPU slice (v5p 2x2x1, described from this
CPU host with libtpu, nothing allocated) with each `pallas_tpu` kernel: Mosaic kernels cannot be partitioned by XLA,
so this fails at lowering unless the kernels run under shard_map (pallas_kernels/shard.py). Each compile runs in a
subprocess (tpu_step_script.py), since libtpu can abort the process. About a minute each on 2 shared cores: slow
suite; the default suite lowers the same kernels under a 4-device abstract TPU mesh
(tests/pallas_kernels/test_shard_kernel.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu")

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    # Lightning (TNL), batch over data=4.
    "tnl-lightning": ["configs/lm/tnl_small.yaml", "model.lightning.implementation=pallas_tpu"],
    # The same with heads split too: data=2, tensor=2 (4 heads).
    "tnl-lightning-tensor2": ["configs/lm/tnl_small.yaml", "model.lightning.implementation=pallas_tpu",
                              "mesh.data=2", "mesh.tensor=2"],
    # The TPU defaults: splash sliding window (first in its TPU order), BASED on "xla" (no TPU evidence yet).
    "quickstart-defaults": ["configs/lm/quickstart.yaml"],
    # BASED and splash sliding window, both named explicitly.
    "based-swa": ["configs/lm/based_small.yaml", "model.based.implementation=pallas_tpu",
                  "model.sliding_window.implementation=pallas_tpu"],
}


def compile_step(topology: str, args: list[str]) -> dict:
    # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes a machine-wide lock file, which a concurrent compile holds.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.train.tpu_step_script", topology, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode < 0:
        pytest.fail(f"{topology} {args}: the compiler killed the process with signal {-proc.returncode}")
    assert proc.returncode == 0, f"{topology} {args}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_train_step_compiles_for_tpu_with_pallas_kernels(case):
    out = compile_step("v5p:2x2x1", CASES[case])
    assert out["kernels"] >= 3, out  # the kernels are in the step (a forward and two backward kernels at least)
