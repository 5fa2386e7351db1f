#!/usr/bin/env bash
# End to end on a CUDA machine: `calq quantize --method gptq --format int4` of a model with
# --device cpu and with --device cuda, wall time and peak RSS of each, whether the written
# safetensors are byte-identical, and each run's GPTQ seconds. Calibration: bartowski-v3 SAMPLES x 512.
# Usage: bench/moe_cuda_e2e.sh MODEL_DIR [samples (default 128)]
# Environment: CALQ (a calq binary built with CUDA; default build/release/calq), SHARED, WORK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bench/moe_cuda_e2e.sh MODEL_DIR [samples]}
SAMPLES=${2:-128}
SHARED=${SHARED:-../shared}
W=${WORK_DIR:-build/bench-cuda-e2e}
CALQ=${CALQ:-build/release/calq}
mkdir -p "$W/data"
export CALQ_DATA=$W/data CALQ_OFFLINE=1
ln -sf "$(realpath "$SHARED/data/calibration/calibration_datav3.txt")" "$W/data/"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
for dev in cpu cuda; do
  /usr/bin/time -f "$dev: wall %e s, peak RSS %M KB" $CALQ -q quantize -i "$MODEL" -o "$W/$dev" --method gptq \
    --format int4 --samples "$SAMPLES" --seq-len 512 --device $dev --overwrite 2>&1 | grep -v "^warning"
done
for f in "$W"/cpu/*.safetensors; do
  if cmp -s "$f" "$W/cuda/$(basename "$f")"; then echo "identical: $(basename "$f")"; else echo "DIFFERENT: $(basename "$f")"; fi
done
python3 - "$W" <<'PY'
import json, sys
for d in ("cpu", "cuda"):
    r = json.load(open(f"{sys.argv[1]}/{d}/calq_report.json"))
    mods = r["gptq"]["modules"]
    print(f"{d}: gptq seconds {r['gptq']['seconds']:.1f}, of which GPTQ of the {len(mods)} modules "
          f"{sum(m.get('seconds', 0) for m in mods):.2f}")
PY
