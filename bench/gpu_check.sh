#!/usr/bin/env bash
# The GPU check (`make gpu-check`, bench/gpu_check.py): pytest -m gpu, Trainer throughput
# and host syncs, the loader alone, sclip fit + test, under 5 minutes on one GPU; one summary
# table, written to outputs/gpu_check/summary.md (and $OUT). Arguments go to gpu_check.py:
#   bash bench/gpu_check.sh [--device cpu] [--out DIR] [--images DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_check.py "$@"
