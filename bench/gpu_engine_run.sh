#!/bin/bash
# Runs on a CUDA machine, from the folder holding bundle.tar.xz (scripts/gpu_bundle.sh BUILD DEST
# bench/gpu_engine_run.sh) and data/ (wiki.test.raw, and config.json + tokenizer files of
# bench-qwen3-28m): the GPU forward-pass tests (tests/gpu/engine_cuda_test), compute-sanitizer
# memcheck on a subset of them, then `calq eval` perplexity on --device cpu vs cuda (fp32, bf16)
# over random-weight models of bench-qwen3-28m's and Qwen3-1.7B's shapes (calq generate-model,
# seed 0). Logs go to $OUT (default ./out). docs/cuda.md "Forward pass" quotes its output.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out" "$here/x" "$here/w"
[ -f "$here/data/wiki.test.raw.xz" ] && xz -dkf "$here/data/wiki.test.raw.xz"
. "$here/gpu_env.sh"  # unpacks the bundle, LD_LIBRARY_PATH, SANITIZER
calq=$here/x/bin/calq
{
  date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  ldd "$here/x/bin/engine_cuda_test" | grep -E "not found"
} 2>&1 | tee "$out/machine.txt"
# TESTS=0 skips the tests and the sanitizer; SHAPES="28m 1.7b" (default) picks the eval models.
if [ "${TESTS:-1}" = 1 ]; then
echo "== engine GPU tests"
timeout "${TEST_TIMEOUT:-100}" "$here/x/bin/engine_cuda_test" > "$out/engine_tests.log" 2>&1
echo "tests rc=$?"
grep -E "parity|FAILED|PASSED|SKIPPED|Failure|error" "$out/engine_tests.log" | head -80
echo "== compute-sanitizer memcheck (subset)"
cs=$SANITIZER
if [ -n "$cs" ]; then
  timeout "${SAN_TIMEOUT:-60}" "$cs" --tool memcheck --error-exitcode 9 "$here/x/bin/engine_cuda_test" \
    --gtest_filter='Dense/GpuEngine.LogitsMatchCpu/qwen3_qknorm_*:Dense/GpuEngine.LogitsMatchCpu/gpt2_*:Dense/GpuEngine.LogitsMatchCpu/mistral_swa_bf16:GpuEngineWeights.*:GpuEngineErrors.*' \
    > "$out/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$out/sanitizer.log" | tail -5
else
  echo "compute-sanitizer not found"
fi
fi
echo "== eval: calq eval --metric perplexity, --device cpu vs cuda"
ppl() {  # MODEL CHUNKS EXTRA...
  local m=$1 n=$2; shift 2
  local t0=$(date +%s.%N)
  timeout 120 "$calq" eval --model "$m" --dataset "$here/data/wiki.test.raw" --ctx 512 --chunks "$n" --offline "$@" 2>&1 |
    grep -E "PPL|rror|device" | tail -3
  echo "   ($(basename "$m") chunks=$n $*: wall $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}') s, model load included)"
}
kld() {  # MODEL CHUNKS: KL divergence of the GPU's log-probabilities (fp32, bf16) against the CPU's
  local m=$1 n=$2 base=$here/w/base.logits
  "$calq" -q eval --model "$m" --dataset "$here/data/wiki.test.raw" --ctx 512 --chunks "$n" --offline \
    --metric kl-divergence --save-logits "$base" --device cpu > /dev/null 2>&1 || echo "save-logits failed"
  for p in fp32 bf16; do
    echo "   KLD(cuda $p || cpu), $(basename "$m"), $n chunks:"
    timeout 120 "$calq" -q eval --model "$m" --dataset "$here/data/wiki.test.raw" --ctx 512 --chunks "$n" --offline \
      --metric kl-divergence --reference-logits "$base" --device cuda --gpu-precision $p 2>&1 |
      grep -E "Mean PPL\(Q\)  |Mean PPL\(base\)|Mean    KLD|Maximum KLD|Same top|rror"
  done
  rm -f "$base"
}
for shape in ${SHAPES:-28m 1.7b}; do
  if [ "$shape" = 28m ]; then cfg=$here/data; n_gpu=64; n_cpu=64; else cfg=$here/data/qwen3-1.7b; n_gpu=32; n_cpu=4; fi
  m=$here/w/random-$shape
  [ -d "$cfg" ] || continue
  t0=$(date +%s)
  "$calq" -q generate-model -c "$cfg" -o "$m" --seed 0 --dtype bf16 || continue
  cp "$here"/data/tokenizer*.json "$m/"
  echo "-- $shape (generated in $(($(date +%s) - t0)) s)"
  ppl "$m" "$n_cpu" --device cpu
  ppl "$m" "$n_cpu" --device cuda
  [ "$n_gpu" != "$n_cpu" ] && ppl "$m" "$n_gpu" --device cuda
  ppl "$m" "$n_cpu" --device cuda --gpu-precision bf16
  [ "$n_gpu" != "$n_cpu" ] && ppl "$m" "$n_gpu" --device cuda --gpu-precision bf16
  kld "$m" "${KLD_CHUNKS:-4}"
  rm -rf "$m"
done
