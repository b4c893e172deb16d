#!/usr/bin/env bash
# Quickstart: runs the CPU test suite after making sure .venv is ready. Extra arguments go to pytest.
# The 8-device sharding tests start their own subprocess with 8 fake CPU devices, so one invocation runs all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
