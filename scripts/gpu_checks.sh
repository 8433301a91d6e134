#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, after scripts/build_gpu_bundle.sh packed
# .gpu/ here: every kernel against its CPU reference, the fixtures on the GPU (greedy tokens in
# f32, bf16 logits within 1e-2), NCCL at world size 1, then bench-gpu for each named shape.
# Results go to $OUT (or ./gpu-results). A missing GPU fails the tests (QWEN_REQUIRE_GPU=1).
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export QWEN_REQUIRE_GPU=1 QWEN_REPO_ROOT="$PWD" RUST_LOG=warn
run() { bash .gpu/run_on_gpu.sh "$@"; }
status=0
run .gpu/worker-lib.xz --test-threads 1 2>&1 | tee "$out/worker-lib-tests.txt" || status=1
run .gpu/paged.xz --test-threads 1 2>&1 | tee "$out/paged-tests.txt" || status=1
for shapes in ${BENCH_SHAPES:-qwen2.5-7b qwen-7b qwen2.5-32b}; do
  run .gpu/qwen-worker.xz bench-gpu --shapes "$shapes" --json "$out/bench-$shapes.json" 2>&1 \
    | tee "$out/bench-$shapes.txt" || status=1
done
# What the CUDA graphs buy: the same 7B run, every step eager.
run .gpu/qwen-worker.xz bench-gpu --shapes qwen2.5-7b --no-graphs --json "$out/bench-qwen2.5-7b-eager.json" 2>&1 \
  | tee "$out/bench-qwen2.5-7b-eager.txt" || status=1
exit $status
