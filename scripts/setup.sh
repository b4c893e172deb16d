#!/usr/bin/env bash
# Creates or updates the local virtualenv .venv (idempotent): Python >= 3.12, effarch installed editable with
# its test extra. Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  # .python-version makes pyenv's python3 resolve to 3.12 inside the repository.
  for cand in "${PYTHON:-}" python3 python3.12 python3.13; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
  py=$(pick_python) || { echo "setup: Python >= 3.12 is required (JAX >= 0.11); install it or set PYTHON=" >&2; exit 1; }
  echo "setup: creating .venv with $($py --version)" >&2
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=.venv/.effarch-install-stamp
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing effarch[test] into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
