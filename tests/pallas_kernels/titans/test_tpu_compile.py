"""neural_memory_scan's forward + backward compiles for one TPU chip (v5e, libtpu's AOT compiler on this CPU host).

The associative scan over chunks that xla.py used before aborted libtpu's compiler here (SIGABRT, "Cannot find a
valid window for %slice_add_fusion"), killing the process: the compile runs as a job of tests/tpu/harness.py (a
child process; a signal is reported as such). Shapes as the MAC LM's memory (configs/lm/titans_mac_small.yaml: 2
heads of 64, width 128, chunks of 16, mini-batches of 64, a 256-token window).
"""

import importlib.util

import pytest

from tests.tpu.harness import Job, run_jobs


def compile_scan() -> None:
    """The job: the gradient of the scan w.r.t. every input, compiled for one v5e chip."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from effarch.pallas_kernels.titans import neural_memory_scan
    from tests.tpu.harness import tpu_devices

    dev = tpu_devices("v5e")[0]
    B, T, H, D, F, C = 4, 256, 2, 64, 128, 16

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=SingleDeviceSharding(dev))

    def loss(params, k, v, q, lr, eta, alpha):
        y = neural_memory_scan(params, k, v, q, lr, eta, alpha, chunk_size=C, batch_size=64, implementation="xla")
        return jnp.sum(y * y)

    params = {"w1": spec(H, D, F), "w2": spec(H, F, D)}
    x = spec(B, T, H, D)
    args = (params, x, x, x, spec(B, T, H), spec(B, T // C, H), spec(B, T // C, H))
    jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(*args).compile()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra)")
def test_scan_forward_and_backward_compile_for_tpu():
    job = Job("titans neural_memory_scan fwd+bwd on v5e, B4 T256 H2 D64 F128 C16, float32",
              "tests.pallas_kernels.titans.test_tpu_compile:compile_scan")
    result = run_jobs([job])[job.name]
    assert result.ok, str(result)
