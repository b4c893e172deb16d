"""Sliding-window "pallas_tpu" path (splash attention + LocalMask): interpret mode vs the oracle, refusals, lowering.

Splash needs T to be a multiple of 128 (block_kv is a multiple of 128 lanes and divides T), so these tests use
tile-aligned T = 256 and 384 instead of the misaligned sizes of test_xla.py; head dim 64 (a real splash size).
Interpret mode runs the grid sequentially on CPU and checks no TPU rule, hence the cross-lowering test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from effarch.pallas_kernels import sliding_window as swa
from effarch.pallas_kernels.sliding_window import reference, splash
from effarch.pallas_kernels.sliding_window.cudnn import dot_product_attention_window
from tests.helpers.numerics import assert_close, rel_err, value_and_grads

B, K = 2, 64

CASES = [
    # (T, H, Hkv, V, window): MHA, MQA, true GQA (H=6, Hkv=2 tells h // G from h % Hkv), a window that is not a
    # multiple of anything, one that spans two 128-blocks, and V != K.
    (256, 3, 3, 64, 64),
    (256, 3, 1, 64, 128),
    (384, 6, 2, 32, 100),
    (384, 3, 1, 64, 128),
]


def make_inputs(seed, *, T, H, Hkv, V, batch=B, k_dim=K):
    rng = np.random.default_rng(seed)
    shapes = ((batch, T, H, k_dim), (batch, T, Hkv, k_dim), (batch, T, Hkv, V), (batch, T, H, V))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes)


def check_against_reference(q, k, v, cotangent, window, interpret):
    @jax.jit
    def paths(q, k, v, cotangent):
        kernel = functools.partial(splash.sliding_window_splash, window=window, interpret=interpret)
        dense = functools.partial(reference.sliding_window_reference, window=window)
        return value_and_grads(kernel, (q, k, v), cotangent), value_and_grads(dense, (q, k, v), cotangent)

    (out, grads), (out_ref, grads_ref) = paths(q, k, v, cotangent)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-4)


@pytest.mark.parametrize("T, H, Hkv, V, window", CASES)
def test_splash_fwd_bwd_matches_reference_interpret(T, H, Hkv, V, window):
    q, k, v, cotangent = make_inputs(20, T=T, H=H, Hkv=Hkv, V=V)
    check_against_reference(q, k, v, cotangent, window, interpret=True)


def test_splash_tpu_interpreter_no_races():
    # The TPU interpreter simulates VMEM/DMAs, poisons uninitialised memory with NaN and raises on a data race.
    q, k, v, cotangent = make_inputs(21, T=256, H=3, Hkv=1, V=64, batch=1)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    check_against_reference(q, k, v, cotangent, 64, interpret=params)


def test_default_block_sizes():
    assert splash.default_block_sizes(256, 64).block_q == 128
    assert splash.default_block_sizes(384, 1000).block_kv == 128
    assert splash.default_block_sizes(768, 300).block_kv_dkv == 256
    assert splash.default_block_sizes(2048, 4096).block_q_dq == 512


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the refusal off TPU")
def test_explicit_request_fails_off_tpu():
    q, k, v, _ = make_inputs(22, T=256, H=3, Hkv=1, V=64)
    with pytest.raises(NotImplementedError, match="pallas_tpu.*tpu"):
        swa.sliding_window_attention(q, k, v, window=64, implementation="pallas_tpu")
    fallback = jax.jit(functools.partial(swa.sliding_window_attention, window=64, implementation=("pallas_tpu", "xla")))
    with pytest.warns(UserWarning, match="pallas_tpu unavailable"):
        out = fallback(q, k, v)
    expected = jax.jit(functools.partial(reference.sliding_window_reference, window=64))(q, k, v)
    assert_close("fallback", out, expected, 1e-5)


def test_unaligned_length_fails_up_front():
    # Even in interpret mode: T = 200 is not a multiple of 128, and splash would reject the blocks later.
    q, k, v, _ = make_inputs(23, T=200, H=3, Hkv=1, V=64)
    with pytest.raises(NotImplementedError, match="multiple of 128"):
        splash.sliding_window_splash(q, k, v, window=64, interpret=True)


def lower_for_tpu(fn, *specs: jax.ShapeDtypeStruct) -> str:
    """Lowers `fn` for TPU on this CPU host and returns the StableHLO text."""
    device = AbstractDevice(device_kind="TPU v5 lite", platform="tpu", num_cores=1)
    with use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype, k_dim", [(jnp.float32, 64), (jnp.bfloat16, 128)])
def test_splash_lowers_for_tpu(dtype, k_dim):
    # The real Mosaic lowering (block shapes, layouts) that interpret mode skips: forward kernel, and the dq and
    # dkv kernels of splash's backward. Mosaic compilation itself still needs a TPU.
    T, H, Hkv = 256, 6, 2
    q = jax.ShapeDtypeStruct((B, T, H, k_dim), dtype)
    kv = jax.ShapeDtypeStruct((B, T, Hkv, k_dim), dtype)
    # interpret=False: compiled kernels without the backend check, which would see this CPU host.
    attend = functools.partial(splash.sliding_window_splash, window=64, interpret=False)

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    forward = lower_for_tpu(attend, q, kv, kv)
    backward = lower_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert forward.count("tpu_custom_call") == 1
    assert backward.count("tpu_custom_call") == 3


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("Hkv", [8, 2])
def test_splash_fwd_bwd_matches_reference_bf16_on_tpu(Hkv):
    # Compiled on a TPU: bf16 kernel error against the float32 oracle at most 1.5x that of jax.nn's XLA path on the
    # same bf16 inputs (as test_api's cuDNN test). Not yet run: no TPU so far.
    T, H, window = 1024, 8, 256
    q, k, v, cotangent = make_inputs(24, T=T, H=H, Hkv=Hkv, V=128, k_dim=128)
    truth, grads_truth = value_and_grads(
        functools.partial(reference.sliding_window_reference, window=window), (q, k, v), cotangent
    )
    bf = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
    kernel = jax.jit(functools.partial(swa.sliding_window_attention, window=window, implementation="pallas_tpu"))
    out, grads = value_and_grads(kernel, bf, cotangent)
    xla_bf16 = jax.jit(functools.partial(dot_product_attention_window, window=window, implementation="xla"))
    out_ref, grads_ref = value_and_grads(xla_bf16, bf, cotangent)
    assert rel_err(out, truth) <= 1.5 * rel_err(out_ref, truth)
    for g, g_ref, g_truth in zip(grads, grads_ref, grads_truth):
        assert rel_err(g, g_truth) <= 1.5 * rel_err(g_ref, g_truth)
    # On TPU the default order picks pallas_tpu without a fallback warning.
    default = jax.jit(functools.partial(swa.sliding_window_attention, window=window))(*bf)
    assert_close("default", default.astype(jnp.float32), out.astype(jnp.float32), 0.0)
