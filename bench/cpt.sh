#!/usr/bin/env bash
# CPT (W4A8, forward precision cycling 4..8 bits, 8-bit LoRA gradients) against static 4-bit QAT
# (same steps, data and options) on bench-qwen3-28m, trained on bartowski's calibration text (never
# wikitext-2 test) and evaluated by wikitext-2 test perplexity at 4, 6 and 8 bits before and after;
# then the training speed of the same step in PyTorch on the same CPU. Long: about
# STEPS x (4 s on 2 cores) per method at the defaults. Not run by the tests.
#
# Environment overrides: CALQ, SHARED, MODEL, DATA, WIKI, OUT, STEPS, SEQ, BATCH, SAMPLES, RANK,
# CYCLES, CTX, CHUNKS, TORCH_STEPS, LR.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
CALQ=${CALQ:-$ROOT/build/release/calq}
MODEL=${MODEL:-$SHARED/data/models/bench-qwen3-28m}
DATA=${DATA:-$SHARED/data/calibration/calibration_datav3.txt}
WIKI=${WIKI:-$SHARED/data/wikitext-2-raw/wiki.test.raw}
OUT=${OUT:-/tmp/calq-bench-cpt}
STEPS=${STEPS:-200} SEQ=${SEQ:-256} BATCH=${BATCH:-4} SAMPLES=${SAMPLES:-1024} RANK=${RANK:-16}
CYCLES=${CYCLES:-32} CTX=${CTX:-256} CHUNKS=${CHUNKS:-40} TORCH_STEPS=${TORCH_STEPS:-10} LR=${LR:-2e-4}
mkdir -p "$OUT"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
common=(-m "$MODEL" --data "$DATA" --offline --steps "$STEPS" --seq-len "$SEQ" --batch "$BATCH" --samples "$SAMPLES"
        --lora-rank "$RANK" --lora-alpha 32 --lr "$LR" --quantize-inputs --input-bits 8 --gradient-bits 8
        --eval-bits 4,6,8 --eval-data "$WIKI" --eval-ctx "$CTX" --eval-chunks "$CHUNKS" --overwrite)
"$CALQ" train --method cpt --bits 4:8 --cycles "$CYCLES" "${common[@]}" -o "$OUT/cpt" 2>&1 | tee "$OUT/cpt.txt"
"$CALQ" train --method static --bits 4 "${common[@]}" -o "$OUT/static" 2>&1 | tee "$OUT/static.txt"
/usr/bin/python3 "$ROOT/bench/cpt_torch.py" --model "$MODEL" --steps "$TORCH_STEPS" --seq "$SEQ" --batch "$BATCH" \
  --rank "$RANK" --wbits 4 --abits 8 --threads "$(nproc)" | tee "$OUT/torch.txt"
/usr/bin/python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
torch_tps = json.loads(open(f"{out}/torch.txt").read().strip().splitlines()[-1])["tokens_per_second"]
def before(txt, b):
    for line in open(txt):
        if line.startswith(f"before training: perplexity at {b}-bit"):
            return float(line.split(":")[2].split()[0])
print(f"\n| method | PPL 4-bit before -> after | PPL 6-bit | PPL 8-bit | final loss | tokens/s |")
print("|---|---|---|---|---|---|")
for m in ("cpt", "static"):
    log = json.load(open(f"{out}/{m}/training_log.json"))
    ev = {e["bits"]: e["ppl"] for e in log["eval"]}
    cells = [f"{before(f'{out}/{m}.txt', b):.2f} -> {ev[b]:.2f}" for b in (4, 6, 8)]
    loss = log["loss"][-10:]
    print(f"| {m} | " + " | ".join(cells) + f" | {sum(loss)/len(loss):.4f} | {log['tokens_per_second']:.1f} |")
print(f"| PyTorch (same step, W4A8 fake quant) | | | | | {torch_tps:.1f} |")
PY
