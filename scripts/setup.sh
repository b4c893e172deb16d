#!/usr/bin/env bash
# Creates or updates the local virtualenv .venv (idempotent) with exactly the versions in uv.lock: Python >= 3.12,
# every dependency and every extra at the version the suite last passed with, effarch installed editable.
# `uv sync --locked` refuses to run when pyproject.toml and uv.lock disagree, so an edited dependency without a
# refreshed lock fails here instead of installing something untested. Refreshing the lock: docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_uv.sh
"$uv" sync --locked --all-extras --python "$py" --quiet
