#!/usr/bin/env bash
# GPU check for any machine with a CUDA GPU (under 5 minutes): ViT-B/32 from random init,
# bf16 autocast, 64 + 64 images per step, 50 steps for CLIP and for S-CLIP: images/s,
# peak memory and the ratio. Run from the repository root after `make install`:
#   bash bench/gpu_check.sh            (record the output in docs/performance.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
HF_HUB_OFFLINE=1 "$PY" bench/gpu_step.py --model ViT-B-32 --b 64 --steps 50 --precision bf16
