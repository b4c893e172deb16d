"""Sliding-window public API: dispatch rules, the cuDNN argument mapping, ring-buffer prefill/decode == parallel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels import sliding_window as swa
from effarch.pallas_kernels.sliding_window import reference
from effarch.pallas_kernels.sliding_window.cudnn import dot_product_attention_window
from tests.helpers.numerics import assert_close, rel_err, value_and_grads
from tests.pallas_kernels.sliding_window.test_reference import B, K, check_window_convention, make_inputs


def test_default_on_cpu_is_xla():
    q, k, v, _ = make_inputs(4, T=37, Hkv=2)

    @jax.jit
    def paths(q, k, v):
        return (
            swa.sliding_window_attention(q, k, v, window=8),
            swa.sliding_window_attention(q, k, v, window=8, implementation="xla"),
            swa.sliding_window_attention(q, k, v, window=8, implementation="reference"),
        )

    out, out_xla, out_ref = paths(q, k, v)
    assert_close("default", out, out_xla, 0.0)
    assert_close("xla", out_xla, out_ref, 1e-5)


@pytest.mark.parametrize("window", [4])
def test_cudnn_argument_mapping_keeps_window_keys(window):
    # local_window_size=(window - 1, 0) through jax.nn's own XLA path: same arguments the cuDNN path gets.
    attend = jax.jit(functools.partial(dot_product_attention_window, window=window, implementation="xla"))
    check_window_convention(attend, 13, window)
    q, k, v, _ = make_inputs(5, T=13, Hkv=3)
    expected = jax.jit(functools.partial(reference.sliding_window_reference, window=window))(q, k, v)
    assert_close("jax.nn", attend(q, k, v), expected, 1e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_cudnn_explicit_request_fails_off_gpu():
    q, k, v, _ = make_inputs(6, T=11, Hkv=2)
    with pytest.raises(NotImplementedError, match="cudnn"):
        swa.sliding_window_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), window=4, implementation="cudnn")
    fallback = jax.jit(functools.partial(swa.sliding_window_attention, window=4, implementation=("cudnn", "xla")))
    with pytest.warns(UserWarning, match="cudnn unavailable"):
        out = fallback(q, k, v)
    expected = jax.jit(functools.partial(reference.sliding_window_reference, window=4))(q, k, v)
    assert_close("fallback", out, expected, 1e-5)


def test_bad_arguments_raise():
    q, k, v, _ = make_inputs(7, T=11, Hkv=2)
    with pytest.raises(ValueError, match="unknown implementation"):
        swa.sliding_window_attention(q, k, v, window=4, implementation="splash")
    with pytest.raises(ValueError, match="window"):
        swa.sliding_window_attention(q, k, v, window=0)
    _, k4, v4, _ = make_inputs(7, T=11, Hkv=4)
    with pytest.raises(ValueError, match="multiple"):
        swa.sliding_window_attention(q, k4, v4, window=4)


@pytest.mark.parametrize("window, splits", [(5, (3, 12)), (5, (12, 13)), (16, (7, 20))])
def test_prefill_and_decode_steps_match_parallel(window, splits):
    # T = 23 > window: the ring buffer wraps. Prompt of splits[0] tokens, decode up to splits[1], then a second
    # prefill that starts from a non-empty cache.
    T, Hkv = 23, 2
    q, k, v, _ = make_inputs(8, T=T, Hkv=Hkv, V=5)
    a, b = splits

    @jax.jit
    def generate(q, k, v):
        cache = swa.sliding_window_init_cache(B, window, Hkv, K, value_dim=5)
        cache, out_a = swa.sliding_window_prefill(cache, q[:, :a], k[:, :a], v[:, :a])
        xs = tuple(x[:, a:b].swapaxes(0, 1) for x in (q, k, v))
        cache, out_b = jax.lax.scan(lambda c, x: swa.sliding_window_decode_step(c, *x), cache, xs)
        cache, out_c = swa.sliding_window_prefill(cache, q[:, b:], k[:, b:], v[:, b:])
        return jnp.concatenate([out_a, out_b.swapaxes(0, 1), out_c], axis=1), cache

    out, cache = generate(q, k, v)
    assert_close("decode", out, reference.sliding_window_reference(q, k, v, window=window), 1e-5)
    # The cache holds the last `window` tokens, token p in slot p % window.
    assert int(cache.pos) == T
    positions = np.arange(T - window, T)
    np.testing.assert_array_equal(np.asarray(cache.k[:, positions % window]), np.asarray(k[:, positions]))
    np.testing.assert_array_equal(np.asarray(cache.v[:, positions % window]), np.asarray(v[:, positions]))


def test_decode_masks_unwritten_slots():
    # Two tokens into a window of 8: six empty (zero) slots must get no probability.
    q, k, v, _ = make_inputs(9, T=2, Hkv=2)
    cache = swa.sliding_window_init_cache(B, 8, 2, K)
    step = jax.jit(swa.sliding_window_decode_step)
    outs = []
    for t in range(2):
        cache, o = step(cache, q[:, t], k[:, t], v[:, t])
        outs.append(o)
    assert_close("decode", jnp.stack(outs, axis=1), reference.sliding_window_reference(q, k, v, window=8), 1e-6)
    assert cache.k.shape == (B, 8, 2, K)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("Hkv", [8, 2])
def test_cudnn_fwd_bwd_matches_reference_bf16(Hkv):
    # T = 200 is not a multiple of the window; head dim 64 as cuDNN wants (multiple of 8).
    Bg, T, Hg, Kg, window = 2, 200, 8, 64, 64
    rng = np.random.default_rng(14)
    q, k, v, cotangent = (
        jnp.asarray(rng.standard_normal(shape, np.float32))
        for shape in ((Bg, T, Hg, Kg), (Bg, T, Hkv, Kg), (Bg, T, Hkv, Kg), (Bg, T, Hg, Kg))
    )
    ref = functools.partial(reference.sliding_window_reference, window=window)
    truth, grads_truth = value_and_grads(ref, (q, k, v), cotangent)
    bf = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
    cudnn = jax.jit(functools.partial(swa.sliding_window_attention, window=window, implementation="cudnn"))
    out, grads = value_and_grads(cudnn, bf, cotangent)
    # Baseline of the same precision: jax.nn's XLA path on the bf16 inputs (bf16 matmuls, like cuDNN). Our
    # reference upcasts to float32 inside, so its bf16 error would be an unfairly small yardstick.
    xla_bf16 = jax.jit(functools.partial(dot_product_attention_window, window=window, implementation="xla"))
    out_ref, grads_ref = value_and_grads(xla_bf16, bf, cotangent)
    assert rel_err(out, truth) <= 1.5 * rel_err(out_ref, truth)
    for g, g_ref, g_truth in zip(grads, grads_ref, grads_truth):
        assert rel_err(g, g_truth) <= 1.5 * rel_err(g_ref, g_truth)
    # With bf16 inputs the GPU default order picks cuDNN without a fallback warning.
    default = jax.jit(functools.partial(swa.sliding_window_attention, window=window))(*bf)
    assert_close("default", default.astype(jnp.float32), out.astype(jnp.float32), 0.0)
