"""The Lightning and BASED Pallas kernels inside `jax.shard_map` with batch and heads sharded (the train step's mesh
axes): interpreted on 8 CPU devices in a subprocess (values and gradients vs the oracles), and cross-lowered for TPU
and CUDA under an abstract 2 x 4 mesh with check_vma=True (the varying-axes types of the kernels' outputs). Also the
ops (splash sliding window too) called under a (data, fsdp, tensor) mesh with no shard_map of the caller's, which
pallas_kernels/shard.py adds."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.pallas_kernels.based import pallas_vjp
from effarch.pallas_kernels.interpret import ENV_VAR
from effarch.pallas_kernels.lightning import api as lightning_api
from tests.helpers.devices import eight_cpu_devices
from tests.helpers.lowering import ABSTRACT_DEVICES, count_kernels, lower_text

ROOT = Path(__file__).resolve().parents[2]
X = P("data", None, "model", None)
STATE = P("data", "model", None, None)


def run_script(dtype: str, cases: list[str]) -> dict[str, float]:
    env = eight_cpu_devices(**{ENV_VAR: "1"})
    proc = subprocess.run([sys.executable, "-m", "tests.pallas_kernels.shard_map_script", dtype, *cases], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(cases), errors
    return errors


# "mesh:" cases: the op called under a mesh with no shard_map of the caller's; pallas_kernels/shard.py splits it.
# One kernel style per op by default (each subprocess pays a fresh JAX start and 8-device compiles); the slow test
# covers the other two combinations and bf16.
DEFAULT_CASES = ["lightning:pallas_tpu", "based:pallas_gpu", "mesh:swa:pallas_tpu"]
OTHER_CASES = ["lightning:pallas_gpu", "based:pallas_tpu", "mesh:lightning:pallas_tpu", "mesh:based:pallas_gpu"]


def test_kernels_under_shard_map_on_8_devices_f32():
    for case, err in run_script("float32", DEFAULT_CASES).items():
        assert err <= 1e-5, f"{case}: relative error {err:.2e}"


@pytest.mark.slow
def test_kernels_under_shard_map_on_8_devices_other_styles_and_bf16():
    for case, err in run_script("float32", OTHER_CASES).items():
        assert err <= 1e-5, f"{case}: relative error {err:.2e}"
    # Kernel and oracle get the same bf16 inputs and both round their outputs to bf16: at most one bf16 ulp apart.
    for case, err in run_script("bfloat16", DEFAULT_CASES + OTHER_CASES).items():
        assert err <= 2.0**-7, f"{case}: relative error {err:.2e}"


@pytest.mark.parametrize("platform, name", [("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")])
def test_compiled_kernels_lower_inside_shard_map(platform, name):
    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2,
                        abstract_device=ABSTRACT_DEVICES[platform])
    light = jax.shard_map(functools.partial(lightning_api._IMPLS[name], block_size=64, interpret=False), mesh=mesh,
                          in_specs=(X, X, X, P("model"), STATE), out_specs=(X, STATE))
    based = jax.shard_map(functools.partial(pallas_vjp.based_pallas_impl, name, chunk_size=64, eps=1e-6,
                                            interpret=False), mesh=mesh, in_specs=(X, X, X), out_specs=X)

    def loss(q, k, v, qf, kf, decay, s0):
        o, state = light(q, k, v, decay, s0)
        return o.astype(jnp.float32).sum() + state.sum() + based(qf, kf, v).astype(jnp.float32).sum()

    def spec(shape, dtype, partition):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, partition))

    b, t, h = 4, 2048, 8
    args = (spec((b, t, h, 64), jnp.bfloat16, X),) * 3 + (spec((b, t, h, 16), jnp.bfloat16, X),) * 2
    args += (spec((h,), jnp.float32, P("model")), spec((b, h, 64, 64), jnp.float32, STATE))
    text = lower_text(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args, platform=platform, mesh=mesh)
    # Lightning's and BASED's two backward kernels each.
    assert count_kernels(text, platform) == 4
