#!/usr/bin/env bash
# Runs the suite against versions other than the lock's, in a venv of its own (.venv-newest / .venv-lowest, rebuilt
# each time), leaving .venv and uv.lock untouched: drift is seen here before users see it (docs/install.md).
#   bash scripts/test_versions.sh newest [pytest args]   the newest versions pyproject.toml allows
#   bash scripts/test_versions.sh lowest [pytest args]   each direct dependency at its lowest allowed version
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  newest) resolution=highest ;;
  lowest) resolution=lowest-direct ;;
  *) echo "usage: bash scripts/test_versions.sh newest|lowest [pytest args]" >&2; exit 2 ;;
esac
kind=$1; shift
source scripts/_uv.sh
venv=".venv-$kind"
rm -rf "$venv"
"$uv" venv --quiet --python "$py" "$venv"
extras=$("$py" -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))')
"$uv" pip install --quiet --python "$venv/bin/python" --resolution "$resolution" -e ".[$extras]"
echo "effarch: $kind versions in $venv:" >&2
"$uv" pip list --python "$venv/bin/python" 2>/dev/null \
  | grep -E -i '^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy|grain|tensorflow-datasets|array-record|ml-dtypes) ' >&2
exec "$venv/bin/python" -m pytest -q -n "${EFFARCH_TEST_WORKERS:-2}" --dist loadfile "$@"
