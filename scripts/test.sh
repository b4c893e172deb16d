#!/usr/bin/env bash
# Quickstart: runs the CPU test suite after making sure .venv is ready. Extra arguments go to pytest.
# The 8-device sharding tests start their own subprocess with 8 fake CPU devices, so one invocation runs all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Let Python cache bytecode (its default) even where the environment says not to (PYTHONDONTWRITEBYTECODE=1, set
# on our development machines): the first process to import jax, flax, optax, orbax and effarch writes the .pyc
# files (into .venv and the repository's __pycache__, both git-ignored), and the test workers and every subprocess
# the tests start (CLI runs, 8-device meshes, the wheel's imports) read them instead of parsing ~9 s of imports
# again each: importing effarch.train.main took 8-9 s without them and 3.4 s with, on a 2-core CI-class machine.
unset PYTHONDONTWRITEBYTECODE
# Two workers (CI has 2 cores; most of a test's time is single-threaded XLA compilation). A file's tests stay on one
# worker (--dist loadfile), so module fixtures such as trained source runs are built once. `-n 0` runs serially.
exec .venv/bin/python -m pytest -q -n "${EFFARCH_TEST_WORKERS:-2}" --dist loadfile "$@"
