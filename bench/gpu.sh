#!/usr/bin/env bash
# Prepared script for a machine with a GPU, under 8 minutes:
#   1. the 224-px training-cost benchmark (timm resnet50 and vit_base_patch16_224, random weights) on CUDA,
#   2. the serving benchmark (bench/serving.py) on the same machine.
# Needs nothing from ../shared (which does not travel to the device machine). Results go to
# $OUT/gpu (the device tool brings $OUT back) or bench/results/gpu; copy them to bench/results/gpu and
# rerun `python -m bench.report` to put them in REPORT.md, labelled with the device.
#
# Usage (device tool):  bash bench/gpu.sh        carry: [".venv"] if the machine lacks torch+timm
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${OUT:-bench/results}/gpu
mkdir -p "$DEST"
LOG="$DEST/gpu_log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

# 1. training cost at 224 px (about 3 minutes on an H100/H200: batch 64, 10 timed steps per configuration)
timeout 300 "$PY" -m bench.training_cost --device cuda --backbones resnet50,vit_base_patch16_224 \
  --no-feature-cache --out "$DEST" 2>&1 | tee -a "$LOG"
echo "training_cost exit: ${PIPESTATUS[0]}" | tee -a "$LOG"

# 2. serving (engine part and the prompt-scale part; the HTTP part needs a running server)
SERVING_ARGS=(--parts engine,scale --backbones resnet50,vit_base_patch16_224 --out "$DEST")
if "$PY" -m bench.serving --help 2>/dev/null | grep -q -- "--device"; then
  SERVING_ARGS+=(--device cuda)
fi
timeout 180 "$PY" -m bench.serving "${SERVING_ARGS[@]}" 2>&1 | tee -a "$LOG"
echo "serving exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
ls -la "$DEST" | tee -a "$LOG"
