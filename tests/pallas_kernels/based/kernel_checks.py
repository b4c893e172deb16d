"""Checks shared by test_pallas_gpu.py and test_pallas_tpu.py: the BASED kernels (in interpret mode on CPU) against
the quadratic oracle, values and every input gradient, and their cross-lowering for the real backend.

Sizes are Pallas-legal for both backends (C = 16, F = 16, V = 32) but misaligned where the kernels must cope:
T = 40 and 7 are not multiples of C (a partial last chunk; a single partial chunk), H = 3 is odd, V != F.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effarch.pallas_kernels.based import based_linear_attention, pallas_vjp, reference
from tests.helpers.lowering import count_kernels, lower_text
from tests.helpers.numerics import assert_close, rel_err

B, H, F, V, C = 2, 3, 16, 32, 16


def make_inputs(t_len: int, seed: int = 0, f_dim: int = F, v_dim: int = V):
    """q, k, v and the output cotangent, float32."""
    rng = np.random.default_rng(seed)
    shapes = [(B, t_len, H, f_dim), (B, t_len, H, f_dim), (B, t_len, H, v_dim), (B, t_len, H, v_dim)]
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


def vjp_all(fn, q, k, v, d_out):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(d_out.astype(out.dtype))


def through_api(name, chunk_size: int = C):
    return jax.jit(functools.partial(based_linear_attention, chunk_size=chunk_size, implementation=name))


ORACLE = jax.jit(reference.based_quadratic)


def check_f32(fn, t_len, seed, **dims):
    """fn(q, k, v) matches the oracle to 1e-5 relative, the output and dq, dk, dv."""
    q, k, v, d_out = make_inputs(t_len, seed, **dims)
    out, grads = vjp_all(fn, q, k, v, d_out)
    out_ref, grads_ref = vjp_all(ORACLE, q, k, v, d_out)
    assert_close("out", out, out_ref, 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-5)


def check_bf16(fn, t_len, seed):
    """bf16 q, k, v: the kernel's error against the float32 oracle is at most 2x the oracle's own error when fed
    the same bf16 inputs (it rounds the inputs and the output, accumulating in float32)."""
    q, k, v, d_out = make_inputs(t_len, seed)
    truth = vjp_all(ORACLE, q, k, v, d_out)
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    ref_bf16 = vjp_all(ORACLE, *bf, d_out)
    got = vjp_all(fn, *bf, d_out)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    names = ("out", "dq", "dk", "dv")
    for name, g, r, t in zip(names, (got[0], *got[1]), (ref_bf16[0], *ref_bf16[1]), (truth[0], *truth[1])):
        err, ref_err = rel_err(g, t), rel_err(r, t)
        assert ref_err > 0, f"{name}: the bf16 reference has no rounding error, so the test cannot tell"
        assert err <= 2 * ref_err, f"{name}: bf16 kernel error {err:.2e} > 2x the reference's {ref_err:.2e}"


def check_lowering(name: str, platform: str, t_len: int, dtype, chunk_size: int = 64):
    """Forward and backward (through the custom_vjp) lower for `platform` with the kernels' custom calls, at the
    chunk size `based_linear_attention` uses by default, F = 16 and V = 64 (the paper's sizes)."""
    b, h, f, v_dim = 2, 4, 16, 64
    x = jax.ShapeDtypeStruct((b, t_len, h, f), dtype)
    xv = jax.ShapeDtypeStruct((b, t_len, h, v_dim), dtype)
    # interpret=False: compile for the target without the platform check (this host is a CPU).
    attend = functools.partial(pallas_vjp.based_pallas_impl, name, chunk_size=chunk_size, eps=1e-6, interpret=False)

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    forward = lower_text(attend, x, x, xv, platform=platform)
    backward = lower_text(jax.grad(loss, argnums=(0, 1, 2)), x, x, xv, platform=platform)
    assert count_kernels(forward, platform) == 1
    # The two backward kernels only: the residuals are the inputs, so the forward kernel is dead code in a grad.
    assert count_kernels(backward, platform) == 2
    assert "based_bwd_dq" in backward and "based_bwd_dkv" in backward
