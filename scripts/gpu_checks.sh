#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, after scripts/build_gpu_bundle.sh packed
# .gpu/ here. In order, each step under its own timeout so one hang cannot eat the device budget:
#   1. every kernel against its CPU reference (worker lib tests, incl. NCCL at world size 1),
#   2. the fixtures on the GPU (greedy tokens in f32, bf16 logits within 1e-2) and CUDA graphs
#      against eager through the engine (replays counted, golden tokens),
#   3. bench-gpu per shape (graphs on: warm-up of every bucket, replay count, tokens checked
#      against an eager engine on the same weights), MoE and quantized (GPTQ Int4, FP8) 7B
#      shapes included, with the PyTorch anchor in the same run.
# Everything lands in $OUT (or ./gpu-results): each step's full log (RUST_LOG keeps the graph
# capture lines), the bench and anchor JSON, and summary.txt with each step's status and time.
# Planned to finish in under 8 minutes with the defaults; a missing GPU fails the tests.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export QWEN_REQUIRE_GPU=1 QWEN_REPO_ROOT="$PWD" RUST_LOG="${RUST_LOG:-warn,qwen_worker=info}"
summary="$out/summary.txt"
: > "$summary"
status=0

# step NAME SECONDS COMMAND...: runs COMMAND with a timeout, its output in $out/NAME.txt.
step() {
  local name="$1" limit="$2" started rc
  shift 2
  started=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  local verdict=ok
  [ $rc -eq 0 ] || verdict="FAILED rc=$rc"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  printf '%-28s %-24s %4ss\n' "$name" "$verdict" "$(( $(date +%s) - started ))" | tee -a "$summary"
  tail -n 4 "$out/$name.txt"
}
gpu() { bash .gpu/run_on_gpu.sh "$@"; }
anchor_python="${ANCHOR_PYTHON:-/opt/torch/.venv/bin/python3}"
[ -x "$anchor_python" ] || anchor_python=python3

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
step kernel-tests 120 gpu .gpu/worker-lib.xz --test-threads 1
step fixture-tests 120 gpu .gpu/paged.xz --test-threads 1
step engine-graph-tests 120 gpu .gpu/engine.xz --test-threads 1 on_the_gpu
for shapes in ${BENCH_SHAPES:-qwen2.5-7b qwen2.5-32b}; do
  step "bench-$shapes" 180 gpu .gpu/qwen-worker.xz bench-gpu --shapes "$shapes" --json "$out/bench-$shapes.json"
done
# MoE decode runs the fused MoE kernels (routing stays on the device) under CUDA graphs; its
# tokens are checked against an eager engine like the dense shapes'.
step bench-qwen3-30b-a3b 180 gpu .gpu/qwen-worker.xz bench-gpu --shapes qwen3-30b-a3b \
  --json "$out/bench-qwen3-30b-a3b.json"
# Quantized projections on 7B shapes (W4A16 GEMV at decode, dequantize + cuBLAS at prefill):
# the goal at batch 1 is well under bf16's step, the weights being 4x (GPTQ) or 2x (FP8) smaller.
for quant in ${BENCH_QUANT:-gptq-int4 fp8}; do
  step "bench-qwen2.5-7b-$quant" 150 gpu .gpu/qwen-worker.xz bench-gpu --shapes qwen2.5-7b --quant "$quant" \
    --batches 1,8,32 --json "$out/bench-qwen2.5-7b-$quant.json"
done
step anchor 240 "$anchor_python" .gpu/gpu_anchor.py --models "${ANCHOR_MODELS:-7b}" \
  --batches 1,8,32,64 --new 64 --prompt 128 --json "$out/anchor.json"
# Optional extras (longer runs): BENCH_EXTRA="qwen-7b" or BENCH_EAGER=1 (7B without graphs).
for shapes in ${BENCH_EXTRA:-}; do
  step "bench-$shapes" 180 gpu .gpu/qwen-worker.xz bench-gpu --shapes "$shapes" --json "$out/bench-$shapes.json"
done
if [ -n "${BENCH_EAGER:-}" ]; then
  step bench-qwen2.5-7b-eager 180 gpu .gpu/qwen-worker.xz bench-gpu --shapes qwen2.5-7b --no-graphs \
    --json "$out/bench-qwen2.5-7b-eager.json"
fi
exit $status
