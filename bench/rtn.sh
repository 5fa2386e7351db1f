#!/usr/bin/env bash
# RTN benchmark: int4 g128 and nvfp4 on bench-qwen3-28m and on a random-weight model with
# Qwen3-8B shapes (generated once, streamed; needs ~17 GB of disk). Prints a markdown table with
# wall time, throughput over the input weights and peak RSS, and the machine it ran on.
# Usage: bench/rtn.sh [WORKDIR]   (default build/bench)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-build/bench}
SHARED=${SHARED:-../shared}
mkdir -p "$WORK"
if [ -z "${CALQ:-}" ]; then
  cmake --preset release >/dev/null && cmake --build --preset release -j "$(nproc)" --target calq >/dev/null
  CALQ=build/release/calq
fi

models=()
[ -f "$SHARED/data/models/bench-qwen3-28m/config.json" ] && models+=("bench-qwen3-28m=$SHARED/data/models/bench-qwen3-28m")
if [ -f "$SHARED/data/configs/Qwen3-8B/config.json" ] && [ "${SKIP_8B:-0}" != 1 ]; then
  if [ ! -f "$WORK/qwen3-8b-random/config.json" ]; then
    echo "generating a random bf16 model with Qwen3-8B shapes in $WORK/qwen3-8b-random" >&2
    $CALQ generate-model --config "$SHARED/data/configs/Qwen3-8B" --output "$WORK/qwen3-8b-random" --seed 1 --overwrite
  fi
  models+=("Qwen3-8B shapes (random bf16)=$WORK/qwen3-8b-random")
fi

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
echo "calq $($CALQ --version | awk '{print $2}'), threads: $(nproc)"
echo
echo "| model | format | input | wall s | GB/s (input weights) | peak RSS |"
echo "|---|---|---|---|---|---|"
for entry in "${models[@]}"; do
  name=${entry%%=*}; path=${entry#*=}
  for fmt in "int4 --group-size 128" "nvfp4"; do
    out="$WORK/out-rtn"
    # Drop nothing from the page cache (not root-safe); the first read of each model warms it.
    $CALQ -q quantize --input "$path" --output "$out" --format $fmt --overwrite >/dev/null
    python3 - "$out/calq_report.json" "$name" "$fmt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
gb = r["input_bytes"] / 1e9
print(f"| {sys.argv[2]} | {sys.argv[3].replace(' --group-size ', ' g')} | {gb:.2f} GB | {r['seconds']:.1f} | "
      f"{gb / r['seconds']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} GB |")
PY
  done
done
rm -rf "$WORK/out-rtn"
