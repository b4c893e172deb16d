"""Block-sparse "pallas_gpu" (Triton pallas_call) kernels: interpret mode vs the oracle (values, lse and gradients at
1e-5), CUDA lowering, and the compiled kernels on a GPU (scripts/gpu_check.sh)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch.pallas_kernels.block_sparse.pallas_vjp import block_sparse_pallas
from effarch.pallas_kernels.interpret import ENV_VAR
from tests.helpers.lowering import count_kernels, lower_text
from tests.pallas_kernels.block_sparse import kernel_checks as kc
from tests.pallas_kernels.block_sparse.kernel_checks import Case

NAME = "pallas_gpu"


@pytest.fixture
def interpret_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


def test_per_head_lists_positions_segments_match_reference(interpret_env):
    # One list per query head with GQA (dK/dV summed over the group), non-causal, permuted positions with padding,
    # segments, Tq != Tk, q_block != kv_block, odd D and Dv, empty lists; gradients through o and lse.
    kc.check_f32(kc.through_api(NAME), Case(tq=20, tk=24, hq=2, hkv=1, groups="q", causal=False, positions=True,
                                            segments=True, seed=1))


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    Case(window=True),  # one list per KV head, windows and sinks
    Case(groups="one", hkv=1, positions=True, seed=2),  # one list for all heads (MQA)
    Case(b=2, tq=24, tk=24, hq=2, hkv=2, d=16, dv=16, q_block=8, kv_block=16, kmax=2, segments=True, seed=3),
], ids=["kv-lists-window-sinks", "one-list-mqa", "batch2-aligned-segments"])
def test_more_layouts_match_reference(interpret_env, case):
    kc.check_f32(kc.through_api(NAME), case)


@pytest.mark.slow
def test_bf16_error_within_twice_reference(interpret_env):
    kc.check_bf16(kc.through_api(NAME), Case(d=16, dv=16, seed=4))


@pytest.mark.parametrize("t_len,dtype,groups", [
    (2048, jnp.bfloat16, "kv"),
    pytest.param(2048, jnp.float32, "q", marks=pytest.mark.slow),
    pytest.param(32768, jnp.bfloat16, "q", marks=pytest.mark.slow),
    pytest.param(32768, jnp.float32, "one", marks=pytest.mark.slow),
])
def test_lowers_for_cuda(t_len, dtype, groups):
    kc.check_lowering(NAME, "cuda", t_len, dtype, groups)


@pytest.mark.slow
@pytest.mark.parametrize("platform,name", [("cuda", "pallas_gpu"), ("tpu", "pallas_tpu")])
def test_odd_sizes_lower(platform, name):
    # Padded lengths that are no power of 2 (T 1000), blocks that are not tiles (48 -> 64 and 100 -> 128 on GPU;
    # 48 and 112 on TPU), head dim 80: the backward's three kernels lower.
    x, kv = jax.ShapeDtypeStruct((1, 1000, 4, 80), jnp.bfloat16), jax.ShapeDtypeStruct((1, 1000, 2, 80), jnp.bfloat16)
    idx, cnt = jax.ShapeDtypeStruct((1, 2, 21, 3), jnp.int32), jax.ShapeDtypeStruct((1, 2, 21), jnp.int32)
    attend = functools.partial(block_sparse_pallas, name, q_block=48, kv_block=100, interpret=False)

    def loss(q, k, v, idx, cnt):
        return attend(q, k, v, idx, cnt).astype(jnp.float32).sum()

    assert count_kernels(lower_text(jax.grad(loss, argnums=(0, 1, 2)), x, kv, kv, idx, cnt, platform=platform),
                         platform) == 3


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("case", [Case(d=16, dv=16, seed=11), Case(groups="q", window=True, d=64, dv=64,
                                                                    q_block=64, kv_block=32, tq=300, tk=260, seed=12)])
def test_compiled_bf16_matches_reference_on_gpu(monkeypatch, case):
    # The compiled Triton kernels (no interpretation): bf16 error at most 2x the oracle's own bf16 error.
    monkeypatch.delenv(ENV_VAR, raising=False)
    kc.check_bf16(kc.through_api(NAME), case)
