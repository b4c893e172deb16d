#!/usr/bin/env bash
# Quickstart: trains a config (default: configs/mqar/attention.yaml) after making sure .venv is ready.
#   bash scripts/train.sh [CONFIG.yaml ...] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- configs/mqar/attention.yaml; fi
exec .venv/bin/effarch train "$@"
