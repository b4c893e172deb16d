"""Lightning "pallas_gpu" (Triton pallas_call) kernels: interpret mode vs the oracle, refusals, CUDA lowering."""

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels.interpret import ENV_VAR
from effarch.pallas_kernels.lightning import pallas_gpu
from tests.pallas_kernels.lightning import kernel_checks as kc

NAME = "pallas_gpu"


@pytest.fixture
def interpret_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


@pytest.mark.parametrize("t_len", [40, pytest.param(7, marks=pytest.mark.slow)])  # 40: a partial last chunk
def test_fwd_bwd_matches_reference_f32(interpret_env, t_len):
    kc.check_f32(kc.through_api(NAME), t_len, seed=t_len)


def test_fwd_bwd_bf16_error_within_twice_reference(interpret_env):
    kc.check_bf16(kc.through_api(NAME), 40, seed=3)


def test_sizes_triton_cannot_tile_are_padded(interpret_env):
    # K = 5, V = 7, C = 24 run as 16, 16, 32 (zero padding, pallas_gpu.tile): still the oracle's numbers.
    assert (pallas_gpu.tile(5), pallas_gpu.tile(24), pallas_gpu.tile(64)) == (16, 32, 64)
    kc.check_f32(kc.through_api(NAME, block_size=24), 45, seed=2, k_dim=5, v_dim=7)


@pytest.mark.parametrize("t_len", [2048, 32768])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_cuda(t_len, dtype):
    kc.check_lowering(NAME, "cuda", t_len, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("t_len", [40, 1000])
def test_compiled_bf16_matches_reference_on_gpu(monkeypatch, t_len):
    # The compiled Triton kernels (no interpretation): bf16 error at most 2x the oracle's own bf16 error.
    monkeypatch.delenv(ENV_VAR, raising=False)
    kc.check_bf16(kc.through_api(NAME), t_len, seed=11)
