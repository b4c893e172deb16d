#!/usr/bin/env bash
# Refreshes uv.lock to the newest versions pyproject.toml allows, then installs them into .venv.
# Run the suite afterwards (bash scripts/test.sh) and commit uv.lock only if it passes (docs/install.md).
#   bash scripts/lock.sh                 everything to the newest allowed version
#   bash scripts/lock.sh -P jax -P jaxlib   only these packages (uv lock's --upgrade-package)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_uv.sh
if [ $# -eq 0 ]; then set -- --upgrade; fi
"$uv" lock --python "$py" "$@"
"$uv" sync --locked --all-extras --python "$py" --quiet
"$uv" tree --depth 1 --python "$py" --quiet >&2 || true
