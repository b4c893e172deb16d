"""train/host_malloc.py: when the malloc settings apply, the opt-out, and the child-process environment."""

import subprocess
import sys

from effarch.train import host_malloc


def test_cpu_only_host_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_only_host()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_malloc.cpu_only_host()


def test_opt_out_and_accelerator_hosts_change_nothing(monkeypatch):
    monkeypatch.setenv("EFFARCH_HOST_MALLOC", "0")
    assert host_malloc.retain_freed_memory() is None
    monkeypatch.delenv("EFFARCH_HOST_MALLOC")
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert host_malloc.retain_freed_memory() is None


def test_settings_apply_in_a_fresh_process_and_pass_to_children():
    """In a child Python (this test process keeps its allocator): glibc accepts all three settings, and the child
    environment spells them the way glibc reads them at start."""
    code = ("import os; os.environ['JAX_PLATFORMS'] = 'cpu'; from effarch.train import host_malloc as h; "
            "a = h.retain_freed_memory(); print(sorted(a.items()), sorted(h.env_for_subprocess(a).items()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("[('M_ARENA_MAX', 1), ('M_MMAP_THRESHOLD', 1073741824), ('M_TRIM_THRESHOLD', 1073741824)] "
                           "[('MALLOC_ARENA_MAX', '1'), ('MALLOC_MMAP_THRESHOLD_', '1073741824'), "
                           "('MALLOC_TRIM_THRESHOLD_', '1073741824')]")
    assert host_malloc.env_for_subprocess(None) == {}
