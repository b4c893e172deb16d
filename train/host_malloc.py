"""Keep freed heap memory inside the process (glibc), so jitted CPU calls stop page-faulting their temporaries in.

XLA's CPU runtime allocates each call's temporary buffer afresh (one block of the compiled `temp_size`: 52 MiB for
the Titans layer's fwd+bwd at T 1k, d_model 256; 206 MiB at 4k) and frees it when the call ends. With glibc's
defaults such a block goes back to the kernel on free: it was mmap'ed (above M_MMAP_THRESHOLD, which glibc raises
to at most 32 MiB), or it is trimmed off the heap's top (above M_TRIM_THRESHOLD), or it lives in a worker thread's
arena, whose heaps cannot hold a block past 64 MiB at all. The next call then page-faults every page back in,
zero-filled: 13k minor faults per call at 1k, 52k at 4k, 10-17% of the call on the 2-core machine of
benchmarks/README.md ("Host memory"). One arena and both thresholds at 1 GiB keep the freed blocks for the next call
(the process's resident memory then stays at its peak instead of shrinking between calls).

The arena limit only binds threads that have not allocated yet, so `retain_freed_memory` must run before JAX starts
its backend: `effarch` (train/main.py) and the benchmarks call it first thing. Opt out with EFFARCH_HOST_MALLOC=0.
"""

import ctypes
import ctypes.util
import importlib.util
import os

# mallopt parameters, <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def cpu_only_host() -> bool:
    """Whether JAX will run on the CPU here, judged without starting JAX: JAX_PLATFORMS when set, otherwise no GPU
    plugin installed and no TPU device file."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS):
        return False
    return not (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def retain_freed_memory(threshold: int = 1 << 30) -> dict | None:
    """Sets glibc's M_ARENA_MAX = 1, M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = `threshold` bytes (module docstring).

    Returns the settings applied, or None when nothing was changed: EFFARCH_HOST_MALLOC=0, not glibc, or a host where
    JAX will run on an accelerator (its host-side temporaries are small; untested there).
    """
    if os.environ.get("EFFARCH_HOST_MALLOC", "1") == "0" or not cpu_only_host():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): no mallopt
        return None
    settings = {"M_ARENA_MAX": (_M_ARENA_MAX, 1), "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, threshold),
                "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, threshold)}
    applied = {name: value for name, (param, value) in settings.items() if mallopt(param, value) == 1}
    return applied or None


def env_for_subprocess(applied: dict | None) -> dict[str, str]:
    """The same settings as environment variables, for a child process (glibc reads them at its start)."""
    if not applied:
        return {}
    names = {"M_ARENA_MAX": "MALLOC_ARENA_MAX", "M_MMAP_THRESHOLD": "MALLOC_MMAP_THRESHOLD_",
             "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_"}
    return {names[k]: str(v) for k, v in applied.items()}
