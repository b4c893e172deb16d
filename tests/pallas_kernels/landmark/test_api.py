"""Landmark public API: dispatch, implementations agree, bad shapes name what is wrong."""

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from effarch.pallas_kernels.landmark import landmark_attention
from tests.helpers.numerics import assert_close
from tests.pallas_kernels.landmark.inputs import layout, make_inputs


def test_default_on_cpu_is_xla_and_implementations_agree():
    q, k, v, _ = make_inputs(20, 19)
    lm = jnp.asarray(layout("misaligned", 19))

    @jax.jit
    def paths(q, k, v):
        return (
            landmark_attention(q, k, v, lm, block_size=8),
            landmark_attention(q, k, v, lm, block_size=8, implementation="xla"),
            landmark_attention(q, k, v, lm, implementation="reference"),
            landmark_attention(q, k, v, lm, implementation=("reference", "xla")),
        )

    out, out_xla, out_ref, out_seq = paths(q, k, v)
    assert_close("default", out, out_xla, 0.0)
    assert_close("xla", out_xla, out_ref, 1e-5)
    assert_close("sequence", out_seq, out_ref, 0.0)


def test_unknown_implementation_raises():
    q, k, v, _ = make_inputs(21, 5)
    lm = jnp.zeros((2, 5), bool)
    for impl in ("pallas_gpu", ("xla", "triton")):
        with pytest.raises(ValueError, match="unknown implementation"):
            landmark_attention(q, k, v, lm, implementation=impl)


@pytest.mark.parametrize("bad", ["is_landmark", "k", "v"])
def test_bad_shapes_name_the_argument(bad):
    args = dict(zip(("q", "k", "v"), make_inputs(22, 5)[:3]), is_landmark=jnp.zeros((2, 5), bool))
    args[bad] = args[bad][:, :4]
    # Under pytest jaxtyping rejects the shape before the function body runs; without it, the body's ValueError.
    with pytest.raises((ValueError, TypeCheckError), match=bad):
        landmark_attention(**args)
    with pytest.raises(ValueError, match=f"{bad} shape"):
        landmark_attention.__wrapped__(**args)


def test_bad_block_size_raises():
    q, k, v, _ = make_inputs(23, 5)
    with pytest.raises(ValueError, match="block_size"):
        landmark_attention(q, k, v, jnp.zeros((2, 5), bool), block_size=0)
