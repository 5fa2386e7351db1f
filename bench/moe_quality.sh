#!/usr/bin/env bash
# MoE quantization quality (issue 7, docs/moe.md): on a trained Qwen3-MoE (bench/train_moe.py;
# 8 experts, top-2), KL divergence against the bf16 model on WikiText-2 test (ctx 512, llama.cpp
# chunking), PPL, same-top-p, for RTN, GPTQ with one shared Hessian per layer, per-expert GPTQ
# (routed; all-experts; routing-weighted) and nvfp4 MR-GPTQ. Calibration: bartowski-v3 SAMPLES x 512.
# Prints a markdown table with each row's KLD as a ratio to shared-Hessian GPTQ and to RTN (of the
# same variant: -act rows against act-order shared GPTQ; -xo rows, experts only with attention
# kept in bf16, against experts-only RTN and shared GPTQ).
# Usage: bench/moe_quality.sh MODEL_DIR [chunks (default: all)] [samples (default 128)]
# Environment: ROWS (default: every row below, by name), CALQ (a calq binary: skips the build),
# SHARED, WORK_DIR, REUSE=1 (rows already measured in WORK_DIR are not run again), EVAL_ARGS
# (added to every eval, e.g. "--device cuda": the base and every row then run on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bench/moe_quality.sh MODEL_DIR [chunks] [samples]}
CHUNKS=${2:-}
SAMPLES=${3:-128}
SHARED=${SHARED:-../shared}
W=${WORK_DIR:-build/bench-moe}
source bench/eval_setup.sh
echo "model: $MODEL ($(python3 -c "import json,sys; t=json.load(open(sys.argv[1])); print(t.get('params'), 'params,', t.get('steps'), 'steps, held-out PPL', round(t.get('heldout_ppl', 0), 3))" "$MODEL/TRAINING.json" 2>/dev/null || echo '?'))"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; chunks: ${CHUNKS:-all}; calibration: bartowski-v3 ${SAMPLES}x512; eval: ${EVAL_ARGS:-cpu}"
[ -f "$W/base.logprobs" ] || $CALQ -q eval --metric kl-divergence --model "$MODEL" --save-logits "$W/base.logprobs" "${CH[@]}" ${EVAL_ARGS:-} >/dev/null
CAL=(--samples "$SAMPLES" --seq-len 512)
declare -A ARGS=(
  [int4-rtn]="--format int4 --method rtn"
  [int4-rtn-act]="--format int4 --method rtn --calibration bartowski-v3 ${CAL[*]}"
  [int4-gptq-shared]="--moe-token-weight uniform --format int4 --method gptq --moe-hessian shared ${CAL[*]}"
  [int4-gptq-routed]="--moe-token-weight uniform --format int4 --method gptq ${CAL[*]}"
  [int4-gptq-routed-noblend]="--moe-token-weight uniform --format int4 --method gptq --moe-min-tokens 0 --min-tokens 0 ${CAL[*]}"
  [int4-gptq-all-experts]="--moe-token-weight uniform --format int4 --method gptq --moe-calibration all-experts ${CAL[*]}"
  [int4-gptq-routing-weight]="--format int4 --method gptq ${CAL[*]}"
  [int4-gptq-routing-weight-act]="--format int4 --method gptq --act-order ${CAL[*]}"
  [int4-gptq-routing-weight-xo]="--format int4 --method gptq --keep self_attn ${CAL[*]}"
  [int4-gptq-shared-routing-weight]="--format int4 --method gptq --moe-hessian shared ${CAL[*]}"
  [nvfp4-gptq-routing-weight]="--format nvfp4 --method gptq ${CAL[*]}"
  [nvfp4-mr-gptq-routing-weight]="--format nvfp4 --method mr-gptq ${CAL[*]}"
  [nvfp4-rtn]="--format nvfp4 --method rtn"
  [nvfp4-gptq-shared]="--moe-token-weight uniform --format nvfp4 --method gptq --moe-hessian shared ${CAL[*]}"
  [nvfp4-gptq-routed]="--moe-token-weight uniform --format nvfp4 --method gptq ${CAL[*]}"
  [nvfp4-mr-gptq]="--moe-token-weight uniform --format nvfp4 --method mr-gptq ${CAL[*]}"
  # act-order variants; experts only (attention kept in bf16: the experts' share of the error)
  [int4-gptq-shared-act]="--moe-token-weight uniform --format int4 --method gptq --act-order --moe-hessian shared ${CAL[*]}"
  [int4-gptq-routed-act]="--moe-token-weight uniform --format int4 --method gptq --act-order ${CAL[*]}"
  [int4-rtn-xo]="--format int4 --method rtn --keep self_attn"
  [int4-gptq-shared-xo]="--moe-token-weight uniform --format int4 --method gptq --moe-hessian shared --keep self_attn ${CAL[*]}"
  [int4-gptq-routed-xo]="--moe-token-weight uniform --format int4 --method gptq --keep self_attn ${CAL[*]}"
)
ORDER="int4-rtn int4-rtn-act int4-gptq-shared int4-gptq-routed int4-gptq-routed-noblend int4-gptq-all-experts int4-gptq-routing-weight
  nvfp4-rtn nvfp4-gptq-shared nvfp4-gptq-routed nvfp4-mr-gptq int4-gptq-shared-act int4-gptq-routed-act
  int4-rtn-xo int4-gptq-shared-xo int4-gptq-routed-xo int4-gptq-routing-weight-act int4-gptq-routing-weight-xo
  int4-gptq-shared-routing-weight nvfp4-gptq-routing-weight nvfp4-mr-gptq-routing-weight"
for row in ${ROWS:-$ORDER}; do
  [ -n "${ARGS[$row]:-}" ] || { echo "unknown row $row (rows: $ORDER)" >&2; exit 2; }
  out=$W/$row
  # REUSE=1: keep a row already measured in WORK_DIR (to assemble a table from several runs)
  if [ "${REUSE:-0}" = 1 ] && [ -f "$out.kld.json" ] && [ -f "$out/calq_report.json" ]; then continue; fi
  # shellcheck disable=SC2086
  $CALQ -q quantize -i "$MODEL" -o "$out" ${ARGS[$row]} --overwrite >/dev/null
  $CALQ -q eval --metric kl-divergence --model "$out" --reference-logits "$W/base.logprobs" "${CH[@]}" \
    ${EVAL_ARGS:-} --json "$out.kld.json" >/dev/null
done
python3 - "$W" ${ROWS:-$ORDER} <<'PY'
import json, os, sys
w, rows = sys.argv[1], sys.argv[2:]
k = {r: json.load(open(f"{w}/{r}.kld.json")) for r in rows}
rep = {r: json.load(open(f"{w}/{r}/calq_report.json")) for r in rows}
print("| row | bits/weight | mean KLD | KLD / shared-H GPTQ | KLD / RTN | PPL | PPL(base) | same top p | blended expert inputs | quantize s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    fmt = r.split("-")[0]
    suffix = next((s for s in ("-act", "-xo") if r.endswith(s)), "")
    def ratio(ref):
        ref = f"{fmt}-{ref}{suffix if ref != 'rtn' or suffix == '-xo' else ''}"
        return f"{k[r]['kld_mean'] / k[ref]['kld_mean']:.3f}" if ref in k and ref != r else "—"
    rp = rep[r]
    secs = rp.get("gptq", {}).get("seconds", 0) + rp["seconds"]
    fb = len(rp.get("moe", {}).get("fallback", [])) if "moe" in rp else "—"
    print(f"| {r} | {rp['bits_per_weight_quantized']:.3f} | {k[r]['kld_mean']:.5f} | {ratio('gptq-shared')} | "
          f"{ratio('rtn')} | {k[r]['ppl']:.3f} | {k[r]['ppl_base']:.3f} | {100 * k[r]['same_top_p']:.2f}% | {fb} | {secs:.1f} |")
PY
