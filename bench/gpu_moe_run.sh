#!/bin/bash
# MoE GPU engine run (docs/cuda.md, "MoE on the GPU"), from a folder holding bundle.tar.xz
# (scripts/gpu_bundle.sh BUILD DEST), tok/ (tokenizer.json, tokenizer_config.json, config.json of
# bench-qwen3-16m), moecfg/config.json (a small qwen3_moe config, vocabulary 8192) and text.txt
# (any text), run from a repository root: engine_cuda_test (all), compute-sanitizer on a MoE
# subset, calq eval cpu vs cuda on a random MoE. The test binary has the build's source and
# shared paths compiled in (here /work/wt-moe and /work/shared): they are made to point at this
# checkout and at tok/.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out" "$here/x" "$here/w"
. "$here/gpu_env.sh"  # unpacks the bundle, LD_LIBRARY_PATH, SANITIZER
root=$PWD
mkdir -p /work/wt-moe/build/release /work/shared/data/models/bench-qwen3-16m || echo "cannot create /work paths"
ln -sfn "$root/tests" /work/wt-moe/tests
ln -sfn "$here/x/bin/calq" /work/wt-moe/build/release/calq
cp "$here"/tok/* /work/shared/data/models/bench-qwen3-16m/
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } 2>&1 | tee "$out/machine.txt"
echo "== engine GPU tests"
t0=$(date +%s)
timeout "${TEST_TIMEOUT:-170}" "$here/x/bin/engine_cuda_test" > "$out/engine_tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - t0 )) s)"
grep -E "parity|FAILED|PASSED|SKIPPED|Failure|rror" "$out/engine_tests.log" | head -150
echo "== compute-sanitizer memcheck (MoE subset)"
cs=$SANITIZER
if [ -n "$cs" ]; then
  timeout "${SAN_TIMEOUT:-45}" "$cs" --tool memcheck --error-exitcode 9 "$here/x/bin/engine_cuda_test" \
    --gtest_filter='Random/GpuMoe.MatchesCpu/qwen3moe_e8k2_norm:Random/GpuMoe.MatchesCpu/mixtral_topk_all' > "$out/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$out/sanitizer.log" | tail -5
fi
echo "== calq eval on a random MoE (qwen3_moe, 8 experts top-2, vocab 8192): cpu vs cuda"
calq=$here/x/bin/calq
m=$here/w/moe
"$calq" -q generate-model -c "$here/moecfg" -o "$m" --seed 0 --dtype bf16 && cp "$here"/tok/tokenizer*.json "$m/"
for dev in "--device cpu" "--device cuda" "--device cuda --gpu-precision bf16"; do
  echo "-- $dev"
  timeout 40 "$calq" eval --model "$m" --dataset "$here/text.txt" --ctx 128 --chunks 8 --offline $dev 2>&1 | grep -E "PPL|rror|tok" | tail -3
done
