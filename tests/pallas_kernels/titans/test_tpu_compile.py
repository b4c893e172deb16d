"""neural_memory_scan's forward + backward compiles for one TPU chip (v5e, libtpu's AOT compiler on this CPU host).

The associative scan over chunks that xla.py used before aborted libtpu's compiler here (SIGABRT, "Cannot find a
valid window for %slice_add_fusion"), killing the process: the compile runs in a subprocess and a signal is reported
as such. Shapes as the MAC LM's memory (configs/lm/titans_mac_small.yaml: 2 heads of 64, width 128, chunks of 16,
mini-batches of 64, a 256-token window).
"""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from effarch.pallas_kernels.titans import neural_memory_scan

    dev = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                       chips_per_host_bounds=(2, 2, 1), num_slices=1).devices[0]
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
    print("compiled")
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra)")
def test_scan_forward_and_backward_compile_for_tpu():
    # ALLOW_MULTIPLE_LIBTPU_LOAD: another process compiling for TPU holds libtpu's lockfile.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode < 0:
        pytest.fail(f"libtpu killed the compile with {signal.Signals(-proc.returncode).name}: "
                    f"{[ln for ln in proc.stderr.splitlines() if 'Check failed' in ln][:1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-2000:]
