#!/usr/bin/env bash
# Builds what the GPU checks need with the real CUDA 13.0 toolchain (../shared/gpu/README.md:
# setup_cuda_build_env.sh once per machine; candle's kernels take ~8 min the first time) and packs
# it into .gpu/ (git-ignored, carried to the GPU machine): the release worker, the test binaries
# that check each kernel, the fixtures and the CUDA graphs on the GPU, scripts/gpu_checks.sh to
# run them, and the PyTorch anchor (../shared/bench/gpu_anchor.py) to run beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1090
source "${CUDA_BUILD_ENV:-$HOME/.cache/cuda13-build/env.sh}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cargo build --release --locked --features cuda,nccl -p qwen-worker --bin qwen-worker
cargo test --release --locked --features cuda,nccl -p qwen-worker --lib --test paged --test engine --no-run \
  --message-format=json > "$CARGO_TARGET_DIR/gpu-tests.json"
mkdir -p .gpu
# Debug info stripped: everything carried to the GPU machine must fit in 64 MiB.
pack() { strip --strip-debug -o "$CARGO_TARGET_DIR/packing" "$1" && xz -T2 -c "$CARGO_TARGET_DIR/packing" > "$2"; }
pack "$CARGO_TARGET_DIR/release/qwen-worker" .gpu/qwen-worker.xz
python3 - "$CARGO_TARGET_DIR/gpu-tests.json" > "$CARGO_TARGET_DIR/gpu-tests.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print("worker-lib" if m["target"]["kind"] == ["lib"] else m["target"]["name"], m["executable"])
PY
while read -r name exe; do pack "$exe" ".gpu/$name.xz"; done < "$CARGO_TARGET_DIR/gpu-tests.txt"
cp scripts/gpu_checks.sh .gpu/
if [ -f ../shared/gpu/run_on_gpu.sh ]; then cp ../shared/gpu/run_on_gpu.sh .gpu/; fi
if [ -f ../shared/bench/gpu_anchor.py ]; then cp ../shared/bench/gpu_anchor.py .gpu/; fi
ls -la .gpu
