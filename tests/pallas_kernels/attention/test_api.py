"""dot_product_attention: reference oracle semantics, xla == reference (values and gradients), dispatch rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.attention import attention_reference, dot_product_attention
from tests.helpers.numerics import assert_close, rel_err, value_and_grads

B, H, K = 2, 6, 5


def make_inputs(seed, *, T, S, Hkv, V=K, dtype=jnp.float32):
    # numpy draws: no per-shape compilation of random kernels, which dominates these small tests on CPU.
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

    q, k, v = normal(B, T, H, K), normal(B, S, Hkv, K), normal(B, S, Hkv, V)
    cotangent = normal(B, T, H, V)
    mask = jnp.asarray(rng.random((B, T, S)) < 0.7)
    return q, k, v, cotangent, mask


def numpy_attention(q, k, v, visible, scale):
    """Loop over (b, h, t) in float64: the textbook definition, query head h reads kv head h // (H // Hkv)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    Bq, T, Hq, _ = q.shape
    group = Hq // k.shape[2]
    out = np.zeros((Bq, T, Hq, v.shape[-1]))
    for b in range(Bq):
        for h in range(Hq):
            for t in range(T):
                keys = np.flatnonzero(visible[b, t])
                if keys.size == 0:
                    continue
                logits = scale * k[b, keys, h // group] @ q[b, t, h]
                p = np.exp(logits - logits.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, h // group]
    return out


@pytest.mark.parametrize("Hkv, causal", [(6, True), (3, False), (1, True)])
def test_reference_matches_numpy_loop(Hkv, causal):
    T, S = 11, 13
    q, k, v, _, mask = make_inputs(1, T=T, S=S, Hkv=Hkv, V=7)
    # Empty the first query row of batch 0 to check that it returns 0.
    mask = mask.at[0, 0].set(False)
    visible = np.asarray(mask) & (np.tril(np.ones((T, S), bool)) if causal else True)
    out = jax.jit(functools.partial(attention_reference, causal=causal, scale=0.3))(q, k, v, mask=mask)
    assert_close("out", out, numpy_attention(q, k, v, visible, 0.3), 1e-6)
    assert np.all(np.asarray(out[0, 0]) == 0.0)


@pytest.mark.parametrize("offset", [4, 10])
def test_reference_q_offset_equals_rows_of_full_causal(offset):
    # Query i at absolute position offset + i sees keys <= offset + i: the last T - offset rows of full attention.
    T = 11
    q, k, v, _, _ = make_inputs(2, T=T, S=T, Hkv=3)
    causal_ref = jax.jit(functools.partial(attention_reference, causal=True))
    full = causal_ref(q, k, v)
    # q_offset as a traced value (a decode position) and as a Python int.
    assert_close("traced offset", causal_ref(q[:, offset:], k, v, q_offset=offset), full[:, offset:], 1e-6)
    tail = attention_reference(q[:, offset:], k, v, causal=True, q_offset=offset)
    assert_close("static offset", tail, full[:, offset:], 1e-6)


def test_reference_fully_masked_row_has_zero_gradient():
    q, k, v, cotangent, mask = make_inputs(3, T=11, S=13, Hkv=3)
    mask = mask.at[:, 4].set(False)
    fn = functools.partial(attention_reference, causal=False, mask=mask)
    out, (dq, dk, dv) = value_and_grads(fn, (q, k, v), cotangent)
    assert np.all(np.asarray(out[:, 4]) == 0.0)
    assert np.all(np.asarray(dq[:, 4]) == 0.0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in (dq, dk, dv))


CASES = {
    # name: (T, S, causal, use_mask, Hkv)
    "self_causal_mha": (11, 11, True, False, 6),
    "self_causal_gqa": (11, 11, True, False, 3),
    "self_causal_mqa": (11, 11, True, False, 1),
    "cross_noncausal_gqa": (11, 13, False, False, 3),
    "cross_causal_top_left_mqa": (13, 11, True, False, 1),
    "mask_mha": (11, 13, False, True, 6),
    "mask_causal_gqa": (11, 11, True, True, 3),
    "mask_causal_mqa": (11, 11, True, True, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_xla_fwd_bwd_matches_reference(case):
    T, S, causal, use_mask, Hkv = CASES[case]
    q, k, v, cotangent, mask = make_inputs(4, T=T, S=S, Hkv=Hkv)
    # Rows with no visible key must give 0: query 3 of batch 1 by the mask alone, query 0 of batch 0 only once the
    # causal mask is applied too (its single causal key is masked).
    mask = mask.at[1, 3].set(False).at[0, 0, 0].set(False).at[0, 0, 1:].set(True) if use_mask else None
    kwargs = dict(causal=causal, mask=mask, scale=0.37)
    xla = functools.partial(dot_product_attention, implementation="xla", **kwargs)
    out, grads = jax.jit(value_and_grads, static_argnums=0)(xla, (q, k, v), cotangent)
    ref = functools.partial(attention_reference, **kwargs)
    out_ref, grads_ref = jax.jit(value_and_grads, static_argnums=0)(ref, (q, k, v), cotangent)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-4)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _, _ = make_inputs(5, T=11, S=13, Hkv=3)
    out = dot_product_attention(q, k, v, causal=False, implementation="xla")
    assert_close("scale", out, attention_reference(q, k, v, causal=False, scale=K**-0.5), 1e-5)
    assert rel_err(out, attention_reference(q, k, v, causal=False, scale=1.0)) > 1e-2


def test_xla_bf16_error_within_reference_bf16_error():
    q, k, v, _, _ = make_inputs(6, T=11, S=13, Hkv=3)
    truth = attention_reference(q, k, v, causal=True)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    err_xla = rel_err(dot_product_attention(*bf, causal=True, implementation="xla"), truth)
    err_ref = rel_err(attention_reference(*bf, causal=True), truth)
    assert err_xla <= 1.5 * err_ref, (err_xla, err_ref)


def test_default_on_cpu_is_xla():
    q, k, v, _, mask = make_inputs(7, T=11, S=13, Hkv=1)
    out = dot_product_attention(q, k, v, causal=False, mask=mask)
    assert_close("default", out, dot_product_attention(q, k, v, causal=False, mask=mask, implementation="xla"), 0.0)


def test_gpu_default_skips_cudnn_for_float32(monkeypatch):
    # Pretend to be on GPU: the float32 default goes straight to xla (no warning, which pytest turns into an error);
    # the bf16 default tries cudnn first, which refuses head dim 5 before any work and falls back with a warning.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v, _, _ = make_inputs(14, T=11, S=13, Hkv=3)
    expected = attention_reference(q, k, v, causal=False)
    assert_close("float32", dot_product_attention(q, k, v, causal=False), expected, 1e-5)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    with pytest.warns(UserWarning, match="cudnn unavailable .*multiple of 8"):
        dot_product_attention(*bf, causal=False)


def test_reference_allows_value_dim_but_xla_refuses():
    q, k, v, _, _ = make_inputs(8, T=11, S=13, Hkv=3, V=7)
    assert attention_reference(q, k, v, causal=False).shape == (B, 11, H, 7)
    with pytest.raises(NotImplementedError, match="head dims"):
        dot_product_attention(q, k, v, causal=False, implementation="xla")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_cudnn_explicit_request_fails_on_cpu():
    q, k, v, _, _ = make_inputs(9, T=11, S=13, Hkv=3, dtype=jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="cudnn"):
        dot_product_attention(q, k, v, causal=False, implementation="cudnn")


def test_unknown_implementation_raises():
    q, k, v, _, _ = make_inputs(10, T=11, S=13, Hkv=3)
    with pytest.raises(ValueError, match="unknown implementation"):
        dot_product_attention(q, k, v, causal=False, implementation="flash")
    with pytest.raises(ValueError, match="unknown implementation"):
        dot_product_attention(q, k, v, causal=False, implementation=("xla", "flash"))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fallback")
def test_sequence_falls_back_with_warning():
    q, k, v, _, _ = make_inputs(11, T=11, S=13, Hkv=3)
    with pytest.warns(UserWarning, match="cudnn unavailable"):
        out = dot_product_attention(q, k, v, causal=True, implementation=("cudnn", "xla"))
    assert_close("fallback", out, attention_reference(q, k, v, causal=True), 1e-5)
    with pytest.raises(ExceptionGroup):
        dot_product_attention(q, k, v, causal=True, implementation=("cudnn",))


def test_heads_not_multiple_of_kv_heads_raises():
    q, k, v, _, _ = make_inputs(12, T=11, S=13, Hkv=4)
    with pytest.raises(ValueError, match="multiple"):
        dot_product_attention(q, k, v, causal=False)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("Hkv", [8, 2, 1])
def test_cudnn_fwd_bwd_matches_reference_bf16(Hkv):
    Bg, T, Hg, Kg = 2, 128, 8, 64
    rng = np.random.default_rng(13)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
                          [(Bg, T, Hg, Kg), (Bg, T, Hkv, Kg), (Bg, T, Hkv, Kg), (Bg, T, Hg, Kg)])
    ref = functools.partial(attention_reference, causal=True)
    truth, grads_truth = value_and_grads(ref, (q, k, v), cotangent)
    bf = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
    cudnn = functools.partial(dot_product_attention, causal=True, implementation="cudnn")
    out, grads = value_and_grads(jax.jit(cudnn), bf, cotangent)
    out_ref, grads_ref = value_and_grads(ref, bf, cotangent)
    assert rel_err(out, truth) <= 1.5 * rel_err(out_ref, truth)
    for g, g_ref, g_truth in zip(grads, grads_ref, grads_truth):
        assert rel_err(g, g_truth) <= 1.5 * rel_err(g_ref, g_truth)
