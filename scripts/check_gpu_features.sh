#!/usr/bin/env bash
# Compile-checks (clippy) the worker's GPU features on a machine without CUDA: tools/fake-nvcc
# stands in for nvcc and emits empty PTX, so nothing built here may be linked or run. Its own
# target dir keeps those artefacts away from real builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/tools/fake-nvcc:$PATH" CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=90 \
  CARGO_TARGET_DIR="${GPU_CHECK_TARGET_DIR:-target/gpu-check}" \
  cargo clippy -p qwen-worker --features cuda,nccl --all-targets --locked -- -D warnings
