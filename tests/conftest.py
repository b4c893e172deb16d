import atexit
import importlib.util
import os
import shutil
import tempfile

# Single-device by default; tests that need 8 CPU devices start a subprocess with its own XLA_FLAGS.
os.environ.setdefault("XLA_FLAGS", "")
# libtpu (test extra, for the TPU compile tests) makes jax look for a TPU chip at start and log to stderr when there is
# none. The suite runs on the host's CPU (GPU machines have no libtpu, so their runs are unchanged).
# The TPU compile tests only compile: two test workers (or another process on the host) may load libtpu at once.
if importlib.util.find_spec("libtpu") is not None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# On the CPU, the suite's time is mostly XLA compiling small programs, and most of that is LLVM optimising the code:
# without it (level 0) the tests take about a third less time. It changes no result (no fast-math; the same HLO), only
# how fast the compiled code runs, which no test measures (benchmarks/ do, outside pytest). The subprocesses the tests
# start inherit it; tests that set XLA_FLAGS for 8 devices append to it.
if os.environ.get("JAX_PLATFORMS") == "cpu" and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# A compilation cache for this session (fresh each run, so it never hides a change): the training tests build the same
# tiny models many times, and reusing their executables takes ~40% off the CPU time of tests/train.
_cache = tempfile.mkdtemp(prefix="effarch-jax-cache-")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_default_matmul_precision", "highest")

# Datasets the tests build (the bytes and text tasks' TFDS corpora) go to a directory of this session, shared by the
# xdist workers (a file lock makes one build and the others read), never to the user's ~/.cache/effarch/tfds.
_data = tempfile.mkdtemp(prefix="effarch-data-")
atexit.register(shutil.rmtree, _data, ignore_errors=True)
os.environ["EFFARCH_DATA_DIR"] = os.environ.get("EFFARCH_TEST_DATA_DIR", _data)
