"""Pallas kernels in sharded programs (pallas_kernels/shard.py) and kernel choice by the mesh's platform
(pallas_kernels/dispatch.py `current_platform`), checked from this CPU host under abstract TPU / GPU meshes: the ops
called on sharded inputs with no shard_map of the caller's lower for a 4-device TPU mesh (XLA cannot partition a
Mosaic kernel: without the helper this fails at lowering), and the TPU build picks the TPU kernel when asked and
the TPU default order otherwise. Values under a real 8-device CPU mesh: test_shard_map.py."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, use_abstract_mesh
from jax.sharding import PartitionSpec as P

from effarch.pallas_kernels import dispatch as dispatch_lib
from effarch.pallas_kernels.based import based_linear_attention
from effarch.pallas_kernels.lightning import api as lightning_api
from effarch.pallas_kernels.lightning import lightning_attention
from effarch.pallas_kernels.shard import BATCH, HEADS, kernel_specs
from effarch.pallas_kernels.sliding_window import sliding_window_attention
from tests.helpers.lowering import ABSTRACT_DEVICES, count_kernels, lower_text

AXES = ("data", "fsdp", "tensor")


def mesh(shape, platform="tpu", types=AxisType.Auto):
    return AbstractMesh(shape, AXES, axis_types=(types,) * 3, abstract_device=ABSTRACT_DEVICES[platform])


X = (BATCH, None, HEADS, None)


@pytest.mark.parametrize("shape, b, h, want", [
    ((2, 2, 1), 4, 8, {BATCH: ("data", "fsdp"), HEADS: ()}),
    ((2, 1, 2), 4, 8, {BATCH: ("data",), HEADS: ("tensor",)}),
    ((4, 1, 1), 2, 8, {BATCH: (), HEADS: ()}),  # batch 2 does not split over 4: replicated, still correct
    ((2, 2, 1), 2, 8, {BATCH: ("data",), HEADS: ()}),  # the axes that divide, in mesh order
    ((1, 1, 4), 4, 2, {BATCH: ("tensor",), HEADS: ()}),  # 2 heads do not split over tensor 4: the batch does
])
def test_kernel_specs(shape, b, h, want):
    assert kernel_specs(mesh(shape), [X], [(b, 16, h, 8)]) == want


def test_kernel_specs_heads_must_divide_every_head_dim():
    # GQA: 8 query heads split over 4, but 2 KV heads do not, so heads stay whole.
    assert kernel_specs(mesh((1, 1, 4)), [X, X], [(2, 16, 8, 8), (2, 16, 2, 8)])[HEADS] == ()


def test_manual_axes_are_left_alone():
    # Inside the caller's own shard_map every axis is manual: nothing left to split.
    assert kernel_specs(mesh((2, 2, 2), types=AxisType.Manual), [X], [(8, 16, 8, 8)]) == {BATCH: (), HEADS: ()}


def test_current_platform_follows_the_mesh():
    assert dispatch_lib.current_platform() == jax.default_backend() == "cpu"
    for platform, want in (("tpu", "tpu"), ("cuda", "gpu")):
        with use_abstract_mesh(mesh((1, 1, 1), platform)):
            assert dispatch_lib.current_platform() == want


def test_tpu_mesh_from_a_cpu_host_picks_tpu_kernels():
    impls = {name: (lambda name=name: name) for name in ("xla", "pallas_gpu", "pallas_tpu")}
    tpu_first = {"cpu": ("xla",), "tpu": ("pallas_tpu", "xla")}
    assert dispatch_lib.dispatch("op", impls, None, default_order=tpu_first) == "xla"
    with use_abstract_mesh(mesh((1, 1, 1))):
        assert dispatch_lib.dispatch("op", impls, None, default_order=tpu_first) == "pallas_tpu"
        # An op without evidence keeps its kernel opt-in on TPU too (dispatch.py's KERNEL_EVIDENCE rule).
        assert dispatch_lib.dispatch("op", impls, None, default_order=lightning_api.DEFAULT_ORDER) == "xla"
        dispatch_lib.require_platform("op", "pallas_tpu", "tpu")  # passes: the mesh's devices are TPUs
        with pytest.raises(NotImplementedError, match="needs a gpu backend, not tpu"):
            dispatch_lib.require_platform("op", "pallas_gpu", "gpu")


def spec(m, shape, dtype=jnp.bfloat16, partition=P(("data", "fsdp"), None, "tensor", None)):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(m, partition))


@pytest.mark.parametrize("shape", [(2, 2, 1), (2, 1, 2)], ids=["batch", "batch+heads"])
def test_sharded_ops_lower_for_a_tpu_mesh(shape):
    """The three TPU kernels, forward and backward, called with no implementation argument of interpret=False and
    no shard_map: the TPU mesh makes them compile (platform check), and the helper makes them lower (shard_map).
    Sliding window is in by default (its TPU order starts with splash); Lightning and BASED are asked for."""
    m = mesh(shape)
    b, t, h = 4, 256, 4

    def loss(q, k, v, qf, kf, kv):
        decay = jnp.linspace(0.1, 1.0, h)
        o = lightning_attention(q, k, v, decay, implementation="pallas_tpu").astype(jnp.float32).sum()
        o += based_linear_attention(qf, kf, v, implementation="pallas_tpu").astype(jnp.float32).sum()
        return o + sliding_window_attention(q, kv, kv, window=64).astype(jnp.float32).sum()

    args = [spec(m, (b, t, h, 64))] * 3 + [spec(m, (b, t, h, 16))] * 2 + [spec(m, (b, t, 2, 64))]
    text = lower_text(jax.grad(loss, argnums=range(6)), *args, platform="tpu", mesh=m)
    # Two backward kernels each for Lightning and BASED (their forwards save only the inputs, so only the gradient is
    # kept), splash's forward (it saves the logsumexp) and its two backward kernels.
    assert count_kernels(text, "tpu") == 7
    assert "shard_map" in text or "sdy.manual_computation" in text
