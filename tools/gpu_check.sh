#!/usr/bin/env bash
# Check solov2_d2 on a machine with a CUDA GPU, in at most 8 minutes, and print one summary table.
#
#   bash tools/gpu_check.sh [--no-bootstrap] [options of tools/gpu_check.py]
#   bash tools/gpu_check.sh --steps tests training     # some of the steps
#   bash tools/gpu_check.sh --device cpu --tiny        # the steps' CPU versions, no GPU needed
#
# 1. Builds the environment (tools/bootstrap.sh; skipped with --no-bootstrap). When the machine
#    has an NVIDIA GPU but the environment's torch is a CPU-only build, torch is replaced by
#    SOLOV2_CUDA_TORCH (pip requirements; default "torch==2.14.1 torchvision==0.29.1", PyPI's
#    CUDA 13 builds, which need an NVIDIA driver >= 580; for an older driver pick a build for
#    its CUDA version, e.g. "--index-url https://download.pytorch.org/whl/cu126 torch torchvision").
# 2. Runs tools/gpu_check.py (its docstring lists the steps and tolerances) with what is left of
#    the 8 minutes. Without a usable GPU every step is reported as skipped, with the reason.
# Results: the table on stdout and in output/gpu_check/ (gpu_check.md, gpu_check.json, logs).
# Exit status: 1 when a step failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
BOOTSTRAP=1
if [ "${1:-}" = "--no-bootstrap" ]; then
    BOOTSTRAP=0
    shift
fi
PY="${SOLOV2_VENV:-$ROOT/.venv}/bin/python"

if [ "$BOOTSTRAP" = 1 ]; then
    bash "$ROOT/tools/bootstrap.sh"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
        && [ "$("$PY" -c 'import torch; print(torch.version.cuda is None)')" = True ]; then
        CUDA_TORCH="${SOLOV2_CUDA_TORCH:-torch==2.14.1 torchvision==0.29.1}"
        echo "[gpu_check] this machine has a GPU but torch is a CPU-only build: installing" \
            "$CUDA_TORCH" >&2
        "$PY" -m pip --disable-pip-version-check uninstall -q -y torch torchvision
        SOLOV2_TORCH="$CUDA_TORCH" bash "$ROOT/tools/bootstrap.sh"
    fi
fi

cd "$ROOT"
SOLOV2_GPU_CHECK_START="$START" exec "$PY" tools/gpu_check.py "$@"
