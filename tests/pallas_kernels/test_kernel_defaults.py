"""The Lightning and BASED Pallas kernels are opt-in until a device check has passed: every platform defaults to
"xla", and the default flips only where an op's KERNEL_EVIDENCE names a passing scripts/gpu_check.sh run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels import dispatch as dispatch_lib
from effarch.pallas_kernels.based import api as based_api
from effarch.pallas_kernels.lightning import api as lightning_api


@pytest.mark.parametrize("api", [lightning_api, based_api], ids=["lightning", "based"])
def test_no_evidence_means_xla_everywhere(api):
    assert api.KERNEL_EVIDENCE == {}  # no GPU or TPU run yet: record the run here when there is one
    assert api.DEFAULT_ORDER == {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}
    assert dispatch_lib.DEFAULT_ORDER == api.DEFAULT_ORDER


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_dispatch_picks_xla_on_gpu_and_tpu_unless_asked(platform, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    calls = []
    impls = {name: (lambda name=name: calls.append(name) or name) for name in ("xla", "pallas_gpu", "pallas_tpu")}
    for api in (lightning_api, based_api):
        assert dispatch_lib.dispatch("op", impls, None, default_order=api.DEFAULT_ORDER) == "xla"
        kernel = dispatch_lib.KERNELS[platform]
        assert dispatch_lib.dispatch("op", impls, kernel, default_order=api.DEFAULT_ORDER) == kernel  # opt-in
    # The public ops on the faked platform run their XLA path by default (a kernel would not compile on this CPU).
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32) for _ in range(3))
    decay = jnp.asarray([0.5, 0.9], jnp.float32)
    np.testing.assert_array_equal(lightning_api.lightning_attention(q, k, v, decay, block_size=8),
                                  lightning_api.lightning_attention(q, k, v, decay, block_size=8, implementation="xla"))
    np.testing.assert_array_equal(based_api.based_linear_attention(q, k, v, chunk_size=8),
                                  based_api.based_linear_attention(q, k, v, chunk_size=8, implementation="xla"))


def test_evidence_flips_only_its_platform():
    order = dispatch_lib.kernel_default_order({"gpu": "gpu_check.sh passed: <date, device, commit, summary.json>"})
    assert order == {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("xla",)}
    with pytest.raises(ValueError, match="unknown platform"):
        dispatch_lib.kernel_default_order({"cuda": "x"})
