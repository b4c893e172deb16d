"""Every `pallas_tpu` kernel, forward and backward, compiles for v5e, v5p and v6e (XLA's TPU compiler and Mosaic's
backend, run from this CPU host through libtpu; tests/tpu/harness.py). Compiled, not run: no TPU executes them.

Default suite: each kernel's forward and backward at T = 2k in bfloat16, on one chip per kernel (the chips rotate
over the kernels), except causal attention's splash kernel: the sliding window's splash kernel is the same Mosaic
kernel with another static mask. Slow suite (`-m slow`): the rest of the matrix, T 2k and 32k, bfloat16 and
float32, every chip.
"""

import itertools

import pytest

from tests.tpu.kernels import CHIPS, DIRECTIONS, DTYPES, FORWARD_ONLY, LENGTHS, OPS, kernel_job

# The default suite's chip for each kernel: every chip is compiled for by some kernel.
DEFAULT_CHIP = {kernel: CHIPS[i % len(CHIPS)] for i, kernel in enumerate(OPS) if kernel != "attention"}


def _params():
    for kernel, chip, t, dtype, direction in itertools.product(OPS, CHIPS, LENGTHS, DTYPES, DIRECTIONS):
        if direction == "bwd" and kernel in FORWARD_ONLY:
            continue
        default = chip == DEFAULT_CHIP.get(kernel) and t == LENGTHS[0] and dtype == "bfloat16"
        job = kernel_job(kernel, chip, t, dtype, direction)
        yield pytest.param(job, id=f"{kernel}-{direction}-{chip}-T{t}-{dtype}",
                           marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("job", list(_params()))
def test_kernel_compiles_for_tpu(job, compile_results):
    result = compile_results[job.name]
    assert result.ok, str(result)
