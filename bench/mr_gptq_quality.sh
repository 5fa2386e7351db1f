#!/usr/bin/env bash
# MR-GPTQ quality (issue 6) on bench-qwen3-28m: per FP4 format (nvfp4, mxfp4, fp4 g128) RTN, RTN +
# scale search, RTN + rotation, GPTQ, MR-GPTQ and kurtosis-gated MR-GPTQ; KL divergence against
# the bf16 model on WikiText-2 test (ctx 512, llama.cpp chunking, base logits saved once), PPL,
# same-top-p, bits per weight, quantization time. Calibration: bartowski-v3, SAMPLES × 512 tokens.
# Prints a markdown table and the quality bars (MR-GPTQ ≤ 0.8 × GPTQ for every format; ≤ 0.5 × RTN
# for nvfp4 and mxfp4).
# Usage: bench/mr_gptq_quality.sh [chunks (default: all)] [samples (default 128)] [kurtosis K (default 10)]
# Env: SHARED (../shared), WORK_DIR (build/bench-mr-gptq), FORMATS ("nvfp4 mxfp4 fp4"),
#      METHODS ("rtn rtn-ss rtn-rot gptq mr-gptq mr-gptq-kurt"), BLOCK (128), NO_BUILD, CALQ (a binary).
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${1:-}
SAMPLES=${2:-128}
KURT=${3:-10}
SHARED=${SHARED:-../shared}
MODEL=$SHARED/data/models/bench-qwen3-28m
W=${WORK_DIR:-build/bench-mr-gptq}
FORMATS=${FORMATS:-nvfp4 mxfp4 fp4}
METHODS=${METHODS:-rtn rtn-ss rtn-rot gptq mr-gptq mr-gptq-kurt}
BLOCK=${BLOCK:-128}
source bench/eval_setup.sh  # NO_BUILD=1: use build/release/calq; CALQ: that binary
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; chunks: ${CHUNKS:-all}; calibration: bartowski-v3 ${SAMPLES}x512; hadamard block $BLOCK; kurtosis K $KURT"
BASE=$W/base-${CHUNKS:-all}.logprobs
[ -f "$BASE" ] || $CALQ -q eval --metric kl-divergence --model "$MODEL" --save-logits "$BASE" "${CH[@]}" >/dev/null
CAL=(--calibration bartowski-v3 --samples "$SAMPLES" --seq-len 512)
printf '| format | method | bits/weight | mean KLD | PPL | PPL(base) | same top p | rotated | quantize s |\n|---|---|---|---|---|---|---|---|---|\n'
for fmt in $FORMATS; do
  for method in $METHODS; do
    out=$W/$fmt-$method
    args=(--format "$fmt")
    case $method in
      rtn) args+=(--method rtn) ;;
      rtn-ss) args+=(--method rtn --scale-search) ;;
      rtn-rot) args+=(--method rtn --hadamard-block "$BLOCK") ;;
      gptq) args+=(--method gptq "${CAL[@]}") ;;
      mr-gptq) args+=(--method mr-gptq --hadamard-block "$BLOCK" "${CAL[@]}") ;;
      mr-gptq-kurt) args+=(--method mr-gptq --hadamard-block "$BLOCK" --hadamard-kurtosis-threshold "$KURT" "${CAL[@]}") ;;
      *) echo "unknown method $method" >&2; exit 2 ;;
    esac
    t0=$(date +%s.%N)
    $CALQ -q quantize -i "$MODEL" -o "$out" "${args[@]}" --overwrite >/dev/null
    t1=$(date +%s.%N)
    $CALQ -q eval --metric kl-divergence --model "$out" --reference-logits "$BASE" "${CH[@]}" \
      --json "$out.kld.json" >/dev/null
    python3 - "$out" "$fmt" "$method" "$(echo "$t1 - $t0" | bc)" <<'PY'
import json, sys
out, fmt, method, secs = sys.argv[1:]
k = json.load(open(out + ".kld.json"))
r = json.load(open(out + "/calq_report.json"))
q = [t for t in r["tensors"] if "format" in t]
rot = sum(1 for t in q if t.get("rotation"))
print(f"| {fmt} | {method} | {r['bits_per_weight_quantized']:.3f} | {k['kld_mean']:.5f} | {k['ppl']:.3f} | "
      f"{k['ppl_base']:.3f} | {100 * k['same_top_p']:.2f}% | {rot}/{len(q)} | {float(secs):.1f} |")
PY
  done
done
# The bars, from the JSON files just written.
python3 - "$W" "$FORMATS" <<'PY'
import json, os, sys
w, formats = sys.argv[1], sys.argv[2].split()
def kld(f, m):
    p = os.path.join(w, f"{f}-{m}.kld.json")
    return json.load(open(p))["kld_mean"] if os.path.exists(p) else None
for f in formats:
    mr, g, r = kld(f, "mr-gptq"), kld(f, "gptq"), kld(f, "rtn")
    if mr is None: continue
    if g: print(f"{f}: MR-GPTQ / GPTQ = {mr / g:.3f} (bar 0.8): {'pass' if mr <= 0.8 * g else 'FAIL'}")
    if r and f in ("nvfp4", "mxfp4"):
        print(f"{f}: MR-GPTQ / RTN  = {mr / r:.3f} (bar 0.5): {'pass' if mr <= 0.5 * r else 'FAIL'}")
PY
