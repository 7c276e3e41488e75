#!/usr/bin/env bash
# The Dockerfile's install steps, runnable (and dry-runnable) on their own:
#   infra/install.sh deps [--dry-run]   torch pair for CUDA, detectron2 + DensePose from source
#   infra/install.sh app  [--dry-run]   this package and its dependencies
# Pins: requirements/torch.txt (torch pair) and DETECTRON2_COMMIT below, which must equal
# batchseg.predictors.densepose_configs.PINNED_COMMIT (tests/test_infra.py checks both).
set -euo pipefail
cd "$(dirname "$0")/.."

DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
DETECTRON2_SRC=${DETECTRON2_SRC:-/opt/detectron2}
CUDA_TAG=${CUDA_TAG:-cu128}                       # PyTorch wheel index matching the base image's CUDA
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"7.5;8.0;8.6;8.9;9.0;10.0;12.0"}  # T4 .. H100, B200, RTX 50xx
PIP=${PIP:-pip}

step=${1:?usage: install.sh deps|app [--dry-run]}
dry=${2:-}
run() { if [ "$dry" = "--dry-run" ]; then printf '+ %s\n' "$*"; else "$@"; fi; }

case "$step" in
  deps)
    run "$PIP" install --index-url "https://download.pytorch.org/whl/${CUDA_TAG}" -r requirements/torch.txt
    run "$PIP" install "setuptools<81" ninja opencv-python-headless av scipy
    run git clone --filter=blob:none https://github.com/facebookresearch/detectron2.git "$DETECTRON2_SRC"
    run git -C "$DETECTRON2_SRC" checkout "$DETECTRON2_COMMIT"
    run env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
        "$PIP" install --no-build-isolation "$DETECTRON2_SRC"
    run "$PIP" install --no-build-isolation --no-deps "$DETECTRON2_SRC/projects/DensePose"
    ;;
  app)
    run "$PIP" install .
    ;;
  *)
    echo "install.sh: unknown step '$step' (use deps or app)" >&2
    exit 2
    ;;
esac
