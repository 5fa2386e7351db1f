#!/usr/bin/env bash
# GPTQ against the original reference code (IST-DASLab/gptq) on the CPU, same W, H and threads:
# per-module time and agreement. Needs python3-torch (scripts/install-deps --bench) and a checkout
# of https://github.com/IST-DASLab/gptq given as GPTQ_REPO (it is not part of calq).
# Usage: GPTQ_REPO=/path/to/gptq bench/gptq_vs_reference.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GPTQ_REPO:?set GPTQ_REPO to a checkout of IST-DASLab/gptq}"
PY=${PYTHON:-python3}
THREADS=${1:-$(nproc)}
OUT=${OUT_DIR:-build/bench-gptq}
mkdir -p "$OUT"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target gptq_compare_tool >/dev/null
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads: $THREADS; $("$PY" -c 'import torch; print("torch", torch.__version__)')"
cases=()
run() {  # name rows cols args...
  local name=$1 rows=$2 cols=$3; shift 3
  "$PY" bench/gptq_reference.py --gptq-repo "$GPTQ_REPO" --rows "$rows" --cols "$cols" --tokens $((4 * cols)) \
    --threads "$THREADS" --out "$OUT/$name.npz" "$@"
  cases+=("$OUT/$name.npz")
}
run q4096 4096 4096 --bits 4 --group 128 --sym
run up14336 14336 4096 --bits 4 --group 128 --sym
run q4096asym 4096 4096 --bits 4 --group 128
run q4096act 4096 4096 --bits 4 --group 128 --sym --act-order --static-groups
build/release/bench/gptq_compare_tool "${cases[@]}"
