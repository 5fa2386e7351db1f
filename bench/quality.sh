#!/usr/bin/env bash
# Quality of each method × format on bench-qwen3-28m: KL divergence against the bf16 model on
# WikiText-2 test (ctx 512, llama.cpp chunking), PPL, same-top-p, bits per weight, quantization
# time and peak RSS. Calibration: bartowski-v3, SAMPLES × 512 tokens. Prints a markdown table.
# Usage: bench/quality.sh [chunks (default: all 862)] [samples (default 128)]
# Environment: FORMATS (default "int4 int3 int8 fp4 nvfp4 mxfp4"), METHODS (default
# "rtn rtn-clip rtn-act gptq gptq-act"), CALQ (a calq binary: skips the build), SHARED, WORK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${1:-}
SAMPLES=${2:-128}
SHARED=${SHARED:-../shared}
MODEL=$SHARED/data/models/bench-qwen3-28m
W=${WORK_DIR:-build/bench-quality}
source bench/eval_setup.sh
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; chunks: ${CHUNKS:-all}; calibration: bartowski-v3 ${SAMPLES}x512"
[ -f "$W/base.logprobs" ] || $CALQ -q eval --metric kl-divergence --model "$MODEL" --save-logits "$W/base.logprobs" "${CH[@]}" >/dev/null
printf '| format | method | bits/weight | mean KLD | PPL | PPL(base) | same top p | quantize s | peak RSS |\n|---|---|---|---|---|---|---|---|---|\n'
for fmt in ${FORMATS:-int4 int3 int8 fp4 nvfp4 mxfp4}; do
  for method in ${METHODS:-rtn rtn-clip rtn-act gptq gptq-act}; do
    out=$W/$fmt-$method
    args=(--format "$fmt")
    case $method in
      rtn) args+=(--method rtn) ;;
      rtn-clip) args+=(--method rtn --clip-search) ;;
      rtn-act) args+=(--method rtn --calibration bartowski-v3 --samples "$SAMPLES" --seq-len 512) ;;
      gptq) args+=(--method gptq --samples "$SAMPLES" --seq-len 512) ;;
      gptq-act) args+=(--method gptq --act-order --samples "$SAMPLES" --seq-len 512) ;;
    esac
    $CALQ -q quantize -i "$MODEL" -o "$out" "${args[@]}" --overwrite >/dev/null
    $CALQ -q eval --metric kl-divergence --model "$out" --reference-logits "$W/base.logprobs" "${CH[@]}" \
      --json "$out.kld.json" >/dev/null
    python3 - "$out" "$fmt" "$method" <<'PY'
import json, sys
out, fmt, method = sys.argv[1:]
k = json.load(open(out + ".kld.json"))
r = json.load(open(out + "/calq_report.json"))
secs = r.get("gptq", {}).get("seconds", 0) + r.get("act_scale", {}).get("seconds", 0) + r["seconds"]
print(f"| {fmt} | {method} | {r['bits_per_weight_quantized']:.3f} | {k['kld_mean']:.5f} | {k['ppl']:.3f} | "
      f"{k['ppl_base']:.3f} | {100 * k['same_top_p']:.2f}% | {secs:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
PY
  done
done
