"""The two oracles agree: quadratic masked form == token-by-token recurrence (values, final state, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.lightning import reference
from tests.helpers.numerics import assert_close
from tests.pallas_kernels.lightning.inputs import DECAY, make_inputs


def test_quadratic_known_answer():
    # One head, q = k = 1, v = 2, λ = 1/2: o_0 = 2, o_1 = λ·2 + 2 = 3, o_2 = λ²·2 + λ·2 + 2 = 3.5 = kv_2.
    ones = jnp.ones((1, 3, 1, 1), jnp.float32)
    o, state = reference.lightning_quadratic(ones, ones, 2 * ones, jnp.array([np.log(2.0)], jnp.float32))
    np.testing.assert_allclose(np.asarray(o)[0, :, 0, 0], [2.0, 3.0, 3.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state)[0, 0], [[3.5]], rtol=1e-6)


@pytest.mark.parametrize("with_state", [False, True])
def test_quadratic_matches_scan(with_state):
    q, k, v, state, d_out, d_state = make_inputs(37)
    initial = state if with_state else None

    # Jitted: op-by-op eager autodiff compiles every primitive separately, seconds of the CPU test budget.
    @jax.jit
    def quadratic(q, k, v, decay):
        return reference.lightning_quadratic(q, k, v, decay, initial)

    @jax.jit
    def scan(q, k, v, decay):
        return reference.lightning_scan(q, k, v, decay, initial)

    (o_q, s_q), vjp_q = jax.vjp(quadratic, q, k, v, DECAY)
    (o_s, s_s), vjp_s = jax.vjp(scan, q, k, v, DECAY)
    assert_close("o", o_q, o_s, rtol=1e-5)
    assert_close("final_state", s_q, s_s, rtol=1e-5)
    for name, g_q, g_s in zip(("dq", "dk", "dv", "ddecay"), vjp_q((d_out, d_state)), vjp_s((d_out, d_state))):
        assert_close(name, g_q, g_s, rtol=1e-5)


def test_step_matches_the_closed_form():
    # lightning_scan is lightning_step under lax.scan, so the step is checked against the unrolled definition in
    # float64 numpy: kv_t = λ^(t+1) kv_init + Σ_{s<=t} λ^(t-s) k_sᵀ v_s and o_t = q_t kv_t, per head.
    q, k, v, state, _, _ = make_inputs(5)
    lam = np.exp(-np.asarray(DECAY, np.float64))[None, :, None, None]  # [1, H, 1, 1]
    qn, kn, vn, s0 = (np.asarray(x, np.float64) for x in (q, k, v, state))
    o_s, s_s = reference.lightning_scan(q, k, v, DECAY, state)
    for t in range(q.shape[1]):
        kv = lam ** (t + 1) * s0 + sum(lam ** (t - s) * np.einsum("bhk,bhv->bhkv", kn[:, s], vn[:, s])
                                       for s in range(t + 1))
        state, o_t = reference.lightning_step(state, q[:, t], k[:, t], v[:, t], DECAY)
        want = np.einsum("bhk,bhkv->bhv", qn[:, t], kv)
        assert_close(f"o[{t}]", o_t, want, rtol=1e-5)
        assert_close(f"o_scan[{t}]", o_s[:, t], want, rtol=1e-5)
        assert_close(f"state[{t}]", state, kv, rtol=1e-5)
    assert_close("final_state", s_s, kv, rtol=1e-5)
