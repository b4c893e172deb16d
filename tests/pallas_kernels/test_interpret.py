"""The EFFARCH_PALLAS_INTERPRET contract (pallas_kernels/interpret.py) and the platform default order, checked on
Lightning's kernels: read on every call, "1" interprets on any platform, off means a Pallas name raises on CPU."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from effarch.pallas_kernels import interpret as interp
from effarch.pallas_kernels.lightning import api, lightning_attention
from tests.helpers.numerics import assert_close
from tests.pallas_kernels.lightning import kernel_checks as kc


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("On", True), ("0", False), ("", False),
                                             ("no", False)])
def test_env_values(monkeypatch, value, expected):
    monkeypatch.setenv(interp.ENV_VAR, value)
    assert interp.env_interpret() is expected


def test_resolve_interpret(monkeypatch):
    monkeypatch.delenv(interp.ENV_VAR, raising=False)
    with pytest.raises(NotImplementedError, match="'pallas_gpu' needs a gpu backend, not cpu"):
        interp.resolve_interpret("op", "pallas_gpu", "gpu", None)
    assert interp.resolve_interpret("op", "pallas_gpu", "gpu", False) is False  # cross-lowering: no platform check
    monkeypatch.setenv(interp.ENV_VAR, "1")
    assert interp.resolve_interpret("op", "pallas_tpu", "tpu", None) is True
    params = interp.tpu_interpret_params()
    assert isinstance(params, pltpu.InterpretParams) and params.detect_races


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU behaviour")
@pytest.mark.parametrize("name", [pytest.param("pallas_gpu", marks=pytest.mark.slow), "pallas_tpu"])
def test_env_read_on_every_call(monkeypatch, name):
    q, k, v, _, _, _ = kc.make_inputs(20)
    monkeypatch.delenv(interp.ENV_VAR, raising=False)
    with pytest.raises(NotImplementedError, match=name):
        lightning_attention(q, k, v, kc.DECAY, block_size=kc.C, implementation=name)
    monkeypatch.setenv(interp.ENV_VAR, "1")
    out = lightning_attention(q, k, v, kc.DECAY, block_size=kc.C, implementation=name)
    expected = lightning_attention(q, k, v, kc.DECAY, block_size=kc.C, implementation="reference")
    assert_close(name, out, expected, 1e-5)
    monkeypatch.setenv(interp.ENV_VAR, "0")
    with pytest.raises(NotImplementedError, match=name):
        lightning_attention(q, k, v, kc.DECAY, block_size=kc.C, implementation=name)


@pytest.mark.parametrize("platform, name", [("gpu", "xla"), ("tpu", "xla"), ("cpu", "xla")])
def test_default_order_picks_xla_until_a_kernel_has_run_on_the_platform(monkeypatch, platform, name):
    # The default order is read from jax.default_backend(); pretend to be on `platform` and record which
    # implementation runs. The Pallas kernels are opt-in until scripts/gpu_check.sh has passed on a platform
    # (api.KERNEL_EVIDENCE; tests/pallas_kernels/test_kernel_defaults.py flips it).
    monkeypatch.setenv(interp.ENV_VAR, "1")
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    called = []
    for impl_name, impl in list(api._IMPLS.items()):
        monkeypatch.setitem(api._IMPLS, impl_name, functools.partial(lambda n, f, *a: (called.append(n), f(*a))[1],
                                                                     impl_name, impl))
    q, k, v, _, _, _ = kc.make_inputs(20)
    out = lightning_attention(q, k, v, kc.DECAY, block_size=kc.C)
    assert called == [name]
    assert out.shape == v.shape and bool(jnp.all(jnp.isfinite(out)))
