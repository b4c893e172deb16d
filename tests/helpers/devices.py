"""The environment of a test subprocess with 8 fake CPU devices (XLA_FLAGS is read when jax starts)."""

import os


def eight_cpu_devices(**extra: str) -> dict[str, str]:
    """os.environ with 8 host devices on the CPU platform, the suite's own XLA flags (conftest.py) kept."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}
