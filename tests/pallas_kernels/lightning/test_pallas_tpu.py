"""Lightning "pallas_tpu" (Mosaic) kernels: interpret mode vs the oracle (also under the TPU interpreter's race
detector), refusals, TPU lowering."""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels.interpret import ENV_VAR, tpu_interpret_params
from effarch.pallas_kernels.lightning import api, pallas_tpu
from tests.pallas_kernels.lightning import kernel_checks as kc


@pytest.fixture
def interpret_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


# The default run checks these kernels under the TPU interpreter (the race test below); the HLO interpreter's run
# through the environment variable is also in test_interpret.py and tests/layers/test_pallas_kernels.py.
@pytest.mark.slow
@pytest.mark.parametrize("t_len", [40, 7])
def test_fwd_bwd_matches_reference_f32(interpret_env, t_len):
    kc.check_f32(kc.through_api("pallas_tpu"), t_len, seed=t_len)


@pytest.mark.slow  # the same chunk maths as pallas_gpu, whose bf16 test runs by default
def test_fwd_bwd_bf16_error_within_twice_reference(interpret_env):
    kc.check_bf16(kc.through_api("pallas_tpu"), 40, seed=3)


def test_tpu_interpreter_no_races_nan_poisoned_memory():
    # The TPU interpreter simulates VMEM, poisons uninitialised memory (scratch included) with NaN and raises on a
    # race between grid points: a state read before chunk 0 sets it would show up as NaN.
    attend = jax.jit(functools.partial(api._IMPLS["pallas_tpu"], block_size=kc.C, interpret=tpu_interpret_params()))
    kc.check_f32(attend, 40, seed=5)


@pytest.mark.slow  # the padding is pallas_gpu's test; here only the rounding of C (24 -> 32) and odd K, V blocks
def test_block_size_not_multiple_of_16_is_rounded_up(interpret_env):
    assert (pallas_tpu.chunk(24), pallas_tpu.chunk(16), pallas_tpu.chunk(1)) == (32, 16, 16)
    kc.check_f32(kc.through_api("pallas_tpu", block_size=24), 45, seed=2, k_dim=5, v_dim=7)


@pytest.mark.parametrize("t_len", [2048, 32768])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_tpu(t_len, dtype):
    kc.check_lowering("pallas_tpu", "tpu", t_len, dtype)
