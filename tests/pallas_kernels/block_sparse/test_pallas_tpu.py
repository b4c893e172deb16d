"""Block-sparse "pallas_tpu" (Mosaic) kernels: interpret mode vs the oracle (values, lse and gradients at 1e-5),
under the TPU interpreter's race detector, and TPU lowering. Real TPU compiles: tests/tpu/test_kernels_compile.py."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.pallas_kernels.block_sparse.pallas_vjp import block_sparse_pallas
from effarch.pallas_kernels.interpret import ENV_VAR, tpu_interpret_params
from tests.helpers.lowering import ABSTRACT_DEVICES, count_kernels, lower_text
from tests.pallas_kernels.block_sparse import kernel_checks as kc
from tests.pallas_kernels.block_sparse.kernel_checks import Case

NAME = "pallas_tpu"


@pytest.fixture
def interpret_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


def test_gqa_lists_windows_sinks_match_reference(interpret_env):
    # One list per KV head (a program takes the group's 2 query heads), Tq != Tk, q_block != kv_block, odd D and Dv,
    # per-group window and sinks, empty lists; gradients through o and lse.
    kc.check_f32(kc.through_api(NAME), Case(window=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    Case(groups="q", causal=False, positions=True, segments=True, seed=1),  # per-query-head lists, dK/dV summed
    Case(groups="one", hkv=1, positions=True, seed=2),  # one list for all heads (MQA)
    Case(b=2, tq=24, tk=24, hq=2, hkv=2, d=16, dv=16, q_block=8, kv_block=16, kmax=2, segments=True, seed=3),
], ids=["per-head-noncausal-positions-segments", "one-list-mqa", "batch2-aligned-segments"])
def test_more_layouts_match_reference(interpret_env, case):
    kc.check_f32(kc.through_api(NAME), case)


@pytest.mark.slow
def test_bf16_error_within_twice_reference(interpret_env):
    kc.check_bf16(kc.through_api(NAME), Case(d=16, dv=16, seed=4))


@pytest.mark.slow  # the TPU interpreter costs ~8 ms per grid step
def test_tpu_interpreter_no_races_nan_poisoned_memory():
    # NaN-poisoned scratch and outputs: a running max, sum or accumulator read before its init, or a dK/dV block left
    # unwritten, would show up as NaN.
    attend = functools.partial(block_sparse_pallas, NAME, interpret=tpu_interpret_params())
    kc.check_f32(attend, Case(groups="q", seed=5))


@pytest.mark.parametrize("t_len,dtype,groups", [
    (2048, jnp.bfloat16, "q"),
    pytest.param(2048, jnp.float32, "kv", marks=pytest.mark.slow),
    pytest.param(32768, jnp.bfloat16, "kv", marks=pytest.mark.slow),
    pytest.param(32768, jnp.float32, "q", marks=pytest.mark.slow),
])
def test_lowers_for_tpu(t_len, dtype, groups):
    kc.check_lowering(NAME, "tpu", t_len, dtype, groups)


@pytest.mark.parametrize("shape,groups", [((2, 1, 2), "kv"), pytest.param((2, 2, 1), "one", marks=pytest.mark.slow)],
                         ids=["batch+heads", "batch"])
def test_sharded_call_lowers_for_a_tpu_mesh(shape, groups):
    # Sharded inputs and traced lists under a 4-device TPU mesh, no shard_map of the caller's: shard_kernel splits
    # the batch (and the heads with the lists when each KV head has its own), or XLA could not partition the kernels.
    m = AbstractMesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                     abstract_device=ABSTRACT_DEVICES["tpu"])
    b, t, hq, hkv, n = 4, 512, 4, 2, 4
    hs = {"one": 1, "kv": hkv}[groups]

    def spec(shape_, dtype, partition):
        return jax.ShapeDtypeStruct(shape_, dtype, sharding=NamedSharding(m, partition))

    x = P(("data", "fsdp"), None, "tensor", None)
    lists = P(("data", "fsdp"), "tensor" if hs > 1 else None)
    args = (spec((b, t, hq, 128), jnp.bfloat16, x), spec((b, t, hkv, 128), jnp.bfloat16, x),
            spec((b, t, hkv, 128), jnp.bfloat16, x), spec((b, hs, n, 2), jnp.int32, lists),
            spec((b, hs, n), jnp.int32, lists))

    def loss(q, k, v, idx, cnt):
        o = block_sparse_pallas(NAME, q, k, v, idx, cnt, q_block=128, kv_block=128, window=300, n_sink=4,
                                interpret=False)
        return o.astype(jnp.float32).sum()

    text = lower_text(jax.grad(loss, argnums=(0, 1, 2)), *args, platform="tpu", mesh=m)
    assert count_kernels(text, "tpu") == 3
    assert "shard_map" in text or "sdy.manual_computation" in text


def test_off_platform_request_refuses_before_work(monkeypatch):
    # Without interpret mode a CPU host cannot run the kernel: an explicit request raises before any work, so a
    # sequence of implementations can fall back (pallas_kernels/dispatch.py).
    monkeypatch.delenv(ENV_VAR, raising=False)
    q, k, v, idx, cnt, kw, _ = kc.make(Case())
    with pytest.raises(NotImplementedError, match="tpu"):
        kc.through_api(NAME)(q, k, v, idx, cnt, **kw)


@pytest.mark.slow
def test_empty_lists_give_zero_and_minus_inf(interpret_env):
    # Kmax = 0 (no slot at all): every row sees nothing; o = 0, lse = -inf, gradients zero.
    q, k, v, idx, cnt, kw, cts = kc.make(Case())
    idx, cnt = jnp.zeros(idx.shape[:3] + (0,), jnp.int32), jnp.zeros_like(cnt)
    o, lse, grads = kc.values_and_grads(kc.attend_with(kc.through_api(NAME), idx, cnt, kw), q, k, v, cts)
    assert not jnp.any(o) and bool(jnp.all(jnp.isneginf(lse))) and not any(jnp.any(g) for g in grads)


@pytest.mark.slow  # a libtpu compile
def test_cost_estimate_reaches_xla_cost_analysis():
    # Compiled for one v5e chip: the forward kernel's flops (cost.py: every list slot of traced lists, per query head
    # 2·bq·bk·(Dp + Dvp)) are counted by XLA, which cannot see into the kernel otherwise.
    pytest.importorskip("libtpu", reason="TPU compiles need libtpu (the test extra)")
    from tests.tpu.harness import tpu_devices

    sharding = jax.sharding.make_single_device_sharding(tpu_devices("v5e")[0])
    b, t, hq, hkv, d, block, kmax = 1, 1024, 4, 2, 128, 128, 2
    n = t // block

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    attend = functools.partial(block_sparse_pallas, NAME, q_block=block, kv_block=block, interpret=False)
    compiled = jax.jit(attend).lower(spec((b, t, hq, d)), spec((b, t, hkv, d)), spec((b, t, hkv, d)),
                                     spec((b, hkv, n, kmax), jnp.int32), spec((b, hkv, n), jnp.int32)).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    kernel_flops = b * hkv * n * kmax * (hq // hkv) * 2 * block * block * (d + d)
    assert kernel_flops <= analysis["flops"] < 1.1 * kernel_flops
