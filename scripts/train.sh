#!/usr/bin/env bash
# Quickstart: trains a config (default: configs/lm/quickstart.yaml) after making sure .venv is ready.
#   bash scripts/train.sh [CONFIG.yaml ...] [key=value ...]      (no CONFIG.yaml: the default config)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
case " $* " in
  *.yaml\ *) ;;
  *) set -- configs/lm/quickstart.yaml "$@" ;;
esac
exec .venv/bin/effarch train "$@"
