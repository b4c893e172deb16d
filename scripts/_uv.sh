# Sourced by the scripts that need uv: sets $py (Python >= 3.12) and $uv (the pinned uv, installed on first use).
# uv is pinned so that every machine resolves and installs the same way; it comes from the package index into a small
# tool venv under ~/.cache/effarch/, outside the repository.
UV_VERSION=0.13.9

pick_python() {
  # .python-version makes pyenv's python3 resolve to 3.12 inside the repository.
  for cand in "${PYTHON:-}" python3 python3.12 python3.13; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}

py=$(pick_python) || { echo "effarch: Python >= 3.12 is required (JAX >= 0.11); install it or set PYTHON=" >&2; exit 1; }

if command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
  uv=$(command -v uv)
else
  _tools="${XDG_CACHE_HOME:-$HOME/.cache}/effarch/uv-$UV_VERSION"
  uv="$_tools/bin/uv"
  if [ ! -x "$uv" ]; then
    echo "effarch: installing uv $UV_VERSION into $_tools" >&2
    rm -rf "$_tools"
    "$py" -m venv "$_tools"
    "$_tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  fi
fi

# Never download a Python build (the machines reach only the package registries); use the one picked above.
export UV_PYTHON_DOWNLOADS=never
