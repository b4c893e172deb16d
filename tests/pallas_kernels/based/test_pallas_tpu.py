"""BASED "pallas_tpu" (Mosaic) kernels: interpret mode vs the oracle (also under the TPU interpreter's race
detector), refusals, TPU lowering."""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels.based import pallas_tpu, pallas_vjp
from effarch.pallas_kernels.interpret import ENV_VAR, tpu_interpret_params
from tests.pallas_kernels.based import kernel_checks as kc

NAME = "pallas_tpu"


@pytest.fixture
def interpret_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


@pytest.mark.parametrize("t_len", [40, pytest.param(7, marks=pytest.mark.slow)])  # 40: a partial last chunk
def test_fwd_bwd_matches_reference_f32(interpret_env, t_len):
    kc.check_f32(kc.through_api(NAME), t_len, seed=t_len)


@pytest.mark.slow  # the same chunk maths as pallas_gpu, whose bf16 test runs by default
def test_fwd_bwd_bf16_error_within_twice_reference(interpret_env):
    kc.check_bf16(kc.through_api(NAME), 40, seed=3)


@pytest.mark.slow  # ~3x the HLO interpreter's time; Lightning's TPU kernel runs under it by default
def test_tpu_interpreter_no_races_nan_poisoned_memory():
    # NaN-poisoned scratch: a state read before chunk 0 zeroes it would show up as NaN.
    attend = jax.jit(functools.partial(pallas_vjp.based_pallas_impl, NAME, chunk_size=kc.C, eps=1e-6,
                                       interpret=tpu_interpret_params()))
    kc.check_f32(attend, 40, seed=5)


@pytest.mark.slow  # the padding is pallas_gpu's test; here only the rounding of C (24 -> 32) and odd F, V blocks
def test_chunk_not_multiple_of_16_is_rounded_up(interpret_env):
    assert (pallas_tpu.chunk(24), pallas_tpu.chunk(16)) == (32, 16)
    kc.check_f32(kc.through_api(NAME, chunk_size=24), 45, seed=2, f_dim=5, v_dim=7)


@pytest.mark.parametrize("t_len", [2048, 32768])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_tpu(t_len, dtype):
    kc.check_lowering(NAME, "tpu", t_len, dtype)
