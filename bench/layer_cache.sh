#!/usr/bin/env bash
# The layer cache of true-sequential GPTQ (--layer-cache-memory; docs/engine.md, "Layer cache"):
# `calq quantize --method gptq --format int4 --device cpu` of a model with the cache off
# (--layer-cache-memory 0) and on (the default budget), in the same call on the same machine.
# Prints a table: wall time, the forward stages of calq_report.json (observation passes, the
# Hessian accumulation inside them, output passes), peak RSS, the states' memory, the runs that started at a kept state, and
# whether the two outputs are byte-identical; then the speedup as a ratio.
# Usage: bench/layer_cache.sh [MODEL_DIR (bench-qwen3-28m)] [samples (32)] [seq-len (512)]
# Environment: CALQ (default build/release/calq), SHARED, WORK_DIR, METHOD (gptq), FORMAT (int4),
#              EXTRA (more quantize options, e.g. "--threads 16").
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
MODEL=${1:-$SHARED/data/models/bench-qwen3-28m}
SAMPLES=${2:-32}
SEQ=${3:-512}
W=${WORK_DIR:-build/bench-layer-cache}
CALQ=${CALQ:-build/release/calq}
METHOD=${METHOD:-gptq}
FORMAT=${FORMAT:-int4}
EXTRA=${EXTRA:-}
mkdir -p "$W/data"
export CALQ_DATA=$W/data CALQ_OFFLINE=1
ln -sf "$(realpath "$SHARED/data/calibration/calibration_datav3.txt")" "$W/data/"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
echo "calq $($CALQ --version | awk '{print $2}'); model: $MODEL; $METHOD $FORMAT; calibration bartowski-v3 ${SAMPLES}x${SEQ}; --device cpu $EXTRA"
echo
for run in off on; do
  opt=()
  [ $run = off ] && opt=(--layer-cache-memory 0)
  # shellcheck disable=SC2086
  /usr/bin/time -f "%e %M" -o "$W/$run.time" $CALQ -q quantize -i "$MODEL" -o "$W/$run" --method "$METHOD" \
    --format "$FORMAT" --samples "$SAMPLES" --seq-len "$SEQ" --device cpu --overwrite "${opt[@]}" $EXTRA 2>&1 |
    grep -v "^warning" || true
done
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
rows = {}
for run in ("off", "on"):
    wall, rss = open(f"{w}/{run}.time").read().split()
    g = json.load(open(f"{w}/{run}/calq_report.json"))["gptq"]
    st, lc = g["stages"], g["layer_cache"]
    rows[run] = (float(wall), st["calibration_forward"], st["hessian_accumulate"], st["output_forward"], int(rss) / 1024, lc)
print("| layer cache | wall s | observation passes s | of which Hessian accumulation s | output passes s | peak RSS MiB | states MiB | runs from attn / mid / act |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for run, (wall, obs, hess, out, rss, lc) in rows.items():
    print(f"| {run} | {wall:.2f} | {obs:.2f} | {hess:.2f} | {out:.2f} | {rss:.0f} | {lc['bytes'] / 2**20:.1f} | "
          f"{lc['runs_from_attn']} / {lc['runs_from_mid']} / {lc['runs_from_act']} |")
same = all(open(f"{w}/off/{f}", "rb").read() == open(f"{w}/on/{f}", "rb").read() for f in ("model.safetensors",))
print()
print(f"speedup (wall, off / on): {rows['off'][0] / rows['on'][0]:.2f}x; forward passes "
      f"{(rows['off'][1] + rows['off'][3]) / (rows['on'][1] + rows['on'][3]):.2f}x; "
      f"model.safetensors byte-identical: {'yes' if same else 'NO'}")
PY
