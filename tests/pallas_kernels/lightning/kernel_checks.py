"""Checks shared by test_pallas_gpu.py and test_pallas_tpu.py: the Pallas kernels (in interpret mode on CPU)
against the quadratic oracle, values and every input gradient, and their cross-lowering for the real backend.

Sizes are Pallas-legal for both backends (C = 16, K = 16, V = 32: powers of 2 for Triton, multiples of 16 for
Mosaic) but misaligned where the kernels must cope: T = 40 and 7 are not multiples of C (a partial last chunk; a
single partial chunk), H = 3 is odd, V != K. Interpretation is slow, so these stay tiny.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effarch.pallas_kernels.lightning import api, lightning_attention_with_state, reference
from tests.helpers.lowering import count_kernels, lower_text
from tests.helpers.numerics import assert_close, rel_err

B, H, K, V, C = 2, 3, 16, 32, 16
DECAY = jnp.array([0.3, 0.02, 1.1], jnp.float32)


def make_inputs(t_len: int, seed: int = 0, k_dim: int = K, v_dim: int = V):
    """q, k, v, initial state, and cotangents of the output and the final state, float32."""
    rng = np.random.default_rng(seed)
    shapes = [(B, t_len, H, k_dim), (B, t_len, H, k_dim), (B, t_len, H, v_dim), (B, H, k_dim, v_dim),
              (B, t_len, H, v_dim), (B, H, k_dim, v_dim)]
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


def vjp_all(fn, q, k, v, s0, d_out, d_state):
    """(out, state) and the cotangents of q, k, v, decay and the initial state."""
    (out, state), pullback = jax.vjp(fn, q, k, v, DECAY, s0)
    return out, state, pullback((d_out.astype(out.dtype), d_state))


def through_api(name, block_size: int = C):
    return jax.jit(functools.partial(lightning_attention_with_state, block_size=block_size, implementation=name))


def oracle(q, k, v, decay, s0):
    return reference.lightning_quadratic(q, k, v, jax.lax.stop_gradient(decay), s0)


def check_f32(fn, t_len, seed, **dims):
    """fn(q, k, v, decay, s0) -> (o, state) matches the oracle to 1e-5 relative, values and all gradients."""
    q, k, v, s0, d_out, d_state = make_inputs(t_len, seed, **dims)
    got = vjp_all(fn, q, k, v, s0, d_out, d_state)
    want = vjp_all(jax.jit(oracle), q, k, v, s0, d_out, d_state)
    assert_close("out", got[0], want[0], 1e-5)
    assert_close("final state", got[1], want[1], 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv", "d_decay", "d_initial_state"), got[2], want[2]):
        if name == "d_decay":
            assert not jnp.any(g), "the decay is a fixed schedule: its cotangent must be zero"
        else:
            assert_close(name, g, g_ref, 1e-5)


def check_bf16(fn, t_len, seed):
    """bf16 q, k, v: the kernel's error against the float32 oracle is at most 2x the oracle's own error when fed
    the same bf16 inputs (which rounds the inputs and the output, accumulating in float32)."""
    q, k, v, s0, d_out, d_state = make_inputs(t_len, seed)
    truth = vjp_all(jax.jit(oracle), q, k, v, s0, d_out, d_state)
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    ref_bf16 = vjp_all(jax.jit(oracle), *bf, s0, d_out, d_state)
    got = vjp_all(fn, *bf, s0, d_out, d_state)
    assert got[0].dtype == jnp.bfloat16 and got[2][0].dtype == jnp.bfloat16
    pairs = [("out", got[0], ref_bf16[0], truth[0]), ("final state", got[1], ref_bf16[1], truth[1])]
    pairs += [(n, g, r, t) for n, g, r, t in zip(("dq", "dk", "dv"), got[2], ref_bf16[2], truth[2])]
    for name, g, r, t in pairs:
        err, ref_err = rel_err(g, t), rel_err(r, t)
        assert ref_err > 0, f"{name}: the bf16 reference has no rounding error, so the test cannot tell"
        assert err <= 2 * ref_err, f"{name}: bf16 kernel error {err:.2e} > 2x the reference's {ref_err:.2e}"


def check_lowering(name: str, platform: str, t_len: int, dtype, block_size: int = 64):
    """Forward and backward (through the custom_vjp) lower for `platform` with the kernels' custom calls, at the
    block size `lightning_attention` uses by default and a realistic head dim of 64."""
    b, h, k_dim, v_dim = 2, 4, 64, 64
    x = jax.ShapeDtypeStruct((b, t_len, h, k_dim), dtype)
    xv = jax.ShapeDtypeStruct((b, t_len, h, v_dim), dtype)
    decay = jax.ShapeDtypeStruct((h,), jnp.float32)
    s0 = jax.ShapeDtypeStruct((b, h, k_dim, v_dim), jnp.float32)
    # interpret=False: compile for the target without the platform check (this host is a CPU).
    attend = functools.partial(api._IMPLS[name], block_size=block_size, interpret=False)

    def loss(q, k, v, decay, s0):
        o, state = attend(q, k, v, decay, s0)
        return o.astype(jnp.float32).sum() + state.sum()

    forward = lower_text(attend, x, x, xv, decay, s0, platform=platform)
    backward = lower_text(jax.grad(loss, argnums=(0, 1, 2, 4)), x, x, xv, decay, s0, platform=platform)
    assert count_kernels(forward, platform) == 1
    # The two backward kernels only: the residuals are the inputs, so the forward kernel is dead code in a grad.
    assert count_kernels(backward, platform) == 2
    assert "lightning_bwd_dq" in backward and "lightning_bwd_dkv" in backward
