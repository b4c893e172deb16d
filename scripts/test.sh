#!/usr/bin/env bash
# Quickstart: runs the CPU test suite after making sure .venv is ready. Extra arguments go to pytest.
# The 8-device sharding tests start their own subprocess with 8 fake CPU devices, so one invocation runs all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (CI has 2 cores; most of a test's time is single-threaded XLA compilation). A file's tests stay on one
# worker (--dist loadfile), so module fixtures such as trained source runs are built once. `-n 0` runs serially.
exec .venv/bin/python -m pytest -q -n "${EFFARCH_TEST_WORKERS:-2}" --dist loadfile "$@"
