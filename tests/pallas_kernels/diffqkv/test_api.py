"""diffqkv_attention / selective_v_attention: the public contract, shape errors, dispatch, the jax.nn path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.diffqkv import (
    api,
    default_order,
    diffqkv_attention,
    diffqkv_reference,
    selective_v_attention,
)
from tests.helpers.numerics import assert_close, rel_err, value_and_grads
from tests.pallas_kernels.diffqkv.inputs import make_inputs


def test_contract_shapes_and_default_causal():
    q, k, v, _ = make_inputs(20, T=11, S=11, Hq=12, Hk=2, Hv=4)
    out = diffqkv_attention(q, k, v)
    assert out.shape == (2, 11, 12, 7) and out.dtype == q.dtype
    assert_close("causal by default", out, diffqkv_reference(q, k, v, causal=True), 1e-5)
    assert_close("non-causal", diffqkv_attention(q, k, v, causal=False), diffqkv_reference(q, k, v, causal=False),
                 1e-5)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 5, 6, 5), (2, 5, 4, 5), (2, 5, 3, 7)), "multiple of K heads"),
        (((2, 5, 6, 5), (2, 5, 2, 5), (2, 5, 4, 7)), "multiple of K heads"),
        (((2, 5, 6, 5), (2, 5, 2, 3), (2, 5, 3, 7)), "head dim"),
        (((2, 5, 6, 5), (2, 5, 2, 5), (2, 4, 3, 7)), "key length"),
    ],
)
def test_bad_shapes_raise_value_error(shapes, match):
    # The checks behind the signature: under pytest jaxtyping rejects the last two before the body runs.
    q, k, v = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        api._check_shapes(q, k, v)


def test_default_order_uses_jax_nn_on_gpu_only_where_its_gqa_covers_the_case():
    q, k, v, _ = make_inputs(21, T=3, S=3, Hq=12, Hk=2, Hv=4)
    q2, k2, v2, _ = make_inputs(21, T=3, S=3, Hq=12, Hk=4, Hv=4)
    assert default_order("gpu", q, k, v) == ("xla",)
    assert default_order("gpu", q2, k2, v2) == ("xla",)  # V = 7 != K = 5
    assert default_order("gpu", q2, k2, k2) == ("jax_nn", "xla")
    assert default_order("gpu", q2, k2.astype(jnp.bfloat16), k2) == ("xla",)
    assert default_order("cpu", q2, k2, k2) == ("xla",)
    assert default_order("tpu", q2, k2, k2) == ("xla",)


def test_explicit_implementation_fails_fast():
    q, k, v, _ = make_inputs(22, T=3, S=3, Hq=12, Hk=2, Hv=4)
    with pytest.raises(NotImplementedError, match="as many K heads as V heads"):
        diffqkv_attention(q, k, v, implementation="jax_nn")
    with pytest.raises(ValueError, match="unknown implementation"):
        diffqkv_attention(q, k, v, implementation="flexhead")


@pytest.mark.parametrize("q_offset", [0, 6])
def test_jax_nn_matches_reference_where_it_applies(q_offset):
    # jax.nn.dot_product_attention runs on CPU too (its XLA path), so the GPU route's numerics are checked here.
    q, k, v, cotangent = make_inputs(23, T=5, S=11, Hq=6, Hk=3, Hv=3)
    v = make_inputs(24, T=5, S=11, Hq=6, Hk=3, Hv=3)[1]
    cotangent = cotangent[..., :5]
    out, grads = value_and_grads(
        lambda q, k, v: diffqkv_attention(q, k, v, implementation="jax_nn", q_offset=q_offset), (q, k, v), cotangent
    )
    out_ref, grads_ref = value_and_grads(lambda q, k, v: diffqkv_reference(q, k, v, q_offset=q_offset), (q, k, v),
                                         cotangent)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-5)


def test_selective_v_attention_dispatch():
    q, k, v, _ = make_inputs(25, T=2, S=9, Hq=12, Hk=2, Hv=4)
    kwargs = dict(top_n=9, q_offset=7)
    full = diffqkv_reference(q, k, v, q_offset=7)
    for impl in ("reference", "xla", None):
        assert_close(f"{impl}", selective_v_attention(q, k, v, implementation=impl, **kwargs), full, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("Hk, Hv, dtype", [(4, 4, jnp.bfloat16), (2, 4, jnp.bfloat16), (4, 4, jnp.float32)])
def test_gpu_default_dispatch_matches_reference(Hk, Hv, dtype):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    # Head dim 64 (cuDNN needs a multiple of 8); T = 257 is not a multiple of any tile.
    rng = np.random.default_rng(26)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 257, h, 64), np.float32)) for h in (8, Hk, Hv))
    args = [a.astype(dtype) for a in (q, k, v)]
    assert default_order("gpu", *args)[0] == ("jax_nn" if Hk == Hv else "xla")
    out = jax.jit(diffqkv_attention)(*args)
    exact = diffqkv_reference(q, k, v)
    # bf16: held to twice the error of the oracle run on the same bf16 inputs (marin's rule, with cuDNN's bf16 P).
    tol = 1e-5 if dtype == jnp.float32 else 2 * rel_err(diffqkv_reference(*args), exact)
    assert_close("out", out.astype(jnp.float32), exact, tol)
