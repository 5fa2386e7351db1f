#!/bin/bash
# Runs on a CUDA machine, from the folder holding bundle.tar.xz (scripts/gpu_bundle.sh): the GPU
# tests (ctest label "gpu": tests/gpu/cuda_backend_test), compute-sanitizer memcheck on a subset,
# and the per-module GPTQ benchmark (bench/gptq_cuda_tool). Logs go to $OUT (default ./out).
# Time limits (seconds) per step: T_TESTS, T_BENCH, T_SANITIZER (defaults 240, 240, 150); the
# sanitizer runs last, as the step to lose when a device call's time is short.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out" "$here/x"
. "$here/gpu_env.sh"  # unpacks the bundle, LD_LIBRARY_PATH, SANITIZER
{
  date -u; uname -a; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  ldd "$here/x/bin/cuda_backend_test" | grep -E "not found|cublas|cusolver"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
echo "== GPU tests"
timeout "${T_TESTS:-240}" "$here/x/bin/cuda_backend_test" 2>&1 | tee "$out/gpu_tests.log" | grep -vE "^\[ +(RUN|OK) +\]"
echo "tests rc=${PIPESTATUS[0]}"
echo "== bench"
timeout "${T_BENCH:-240}" "$here/x/bin/gptq_cuda_tool" 8192 2>&1 | tee "$out/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
echo "== compute-sanitizer memcheck (subset)"
cs=$SANITIZER
if [ -n "$cs" ]; then
  timeout "${T_SANITIZER:-150}" "$cs" --tool memcheck --error-exitcode 9 "$here/x/bin/cuda_backend_test" \
    --gtest_filter='AllFormats/GpuGptq.SameCodesAsCpu/int4*:AllFormats/GpuGptq.SameCodesAsCpu/nvfp4_act*:Kernel/GpuGptqShapes.*:GpuHadamard.*:GpuHessian.*:GpuErrors.*' \
    > "$out/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$out/sanitizer.log" | tail -5
else
  echo "compute-sanitizer not found"
fi
