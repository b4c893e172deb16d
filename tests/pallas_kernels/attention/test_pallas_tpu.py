"""dot_product_attention's "pallas_tpu" path (splash attention with a CausalMask or FullMask): interpret mode vs the
oracle, values and gradients, and its refusals. Tile-aligned T (splash needs T % 128 == 0), head dim 64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.attention import attention_reference, dot_product_attention
from effarch.pallas_kernels.attention.splash import attention_splash
from tests.helpers.numerics import assert_close, value_and_grads


@pytest.mark.parametrize("causal, T, H, Hkv", [
    (True, 128, 2, 1),
    pytest.param(True, 256, 6, 2, marks=pytest.mark.slow),  # true GQA over two 128-blocks (h // G, not h % Hkv)
    pytest.param(False, 128, 2, 1, marks=pytest.mark.slow),
])
def test_splash_matches_reference_interpret(causal, T, H, Hkv):
    rng = np.random.default_rng(3)
    shapes = ((1, T, H, 64), (1, T, Hkv, 64), (1, T, Hkv, 64), (1, T, H, 64))
    q, k, v, ct = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)

    @jax.jit
    def paths(q, k, v, ct):
        kernel = functools.partial(attention_splash, causal=causal, scale=0.1, interpret=True)
        dense = functools.partial(attention_reference, causal=causal, scale=0.1)
        return value_and_grads(kernel, (q, k, v), ct), value_and_grads(dense, (q, k, v), ct)

    (out, grads), (out_ref, grads_ref) = paths(q, k, v, ct)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-4)


def test_splash_refusals_are_clear():
    q = jnp.zeros((1, 128, 2, 64))
    with pytest.raises(NotImplementedError, match="pallas_tpu.*tpu"):
        dot_product_attention(q, q, q, causal=True, implementation="pallas_tpu")  # this host is not a TPU
    with pytest.raises(NotImplementedError, match="multiple of 128"):
        attention_splash(q[:, :100], q[:, :100], q[:, :100], causal=True, interpret=True)
    with pytest.raises(NotImplementedError, match="no array mask"):
        attention_splash(q, q, q, causal=True, mask=jnp.ones((1, 128, 128), bool), interpret=True)
