#!/usr/bin/env bash
# Process start-up cost: `calq --version` (wall seconds, peak RSS), beside an empty C program linked
# with the CUDA toolkit's cuBLAS and cuSOLVER (what linking them, instead of opening them at first
# use, costs every process; src/calq/backend/cuda/libs.cpp) and the same program linked with
# nothing. Best of RUNS runs each. Usage: bench/startup.sh [CALQ (build/release/calq)] [CUDA_LIB_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CALQ=${1:-build/release/calq}
CUDA_LIB=${2:-/usr/local/cuda/lib}
RUNS=${RUNS:-5}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo 'int main(void) { return 0; }' > "$tmp/empty.c"
cc "$tmp/empty.c" -o "$tmp/empty"
have_cuda=0
if [ -e "$CUDA_LIB/libcublas.so" ] && [ -e "$CUDA_LIB/libcusolver.so" ]; then
  cc "$tmp/empty.c" -o "$tmp/linked" -Wl,--no-as-needed -L"$CUDA_LIB" -lcublas -lcusolver -Wl,-rpath,"$CUDA_LIB"
  have_cuda=1
fi
best() {  # prints "seconds KB" of the fastest of RUNS runs
  for _ in $(seq "$RUNS"); do /usr/bin/time -f "%e %M" "$@" 2>&1 >/dev/null | tail -1; done | sort -n | head -1
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; best of $RUNS runs"
echo "| program | wall s | peak RSS MB |"
echo "|---|---:|---:|"
row() { read -r s kb <<< "$(best "${@:2}")"; echo "| $1 | $s | $(awk -v k="$kb" 'BEGIN { printf "%.1f", k / 1024 }') |"; }
row "empty C program" "$tmp/empty"
[ "$have_cuda" = 1 ] && row "empty C program linked with cuBLAS + cuSOLVER" "$tmp/linked"
row "calq --version (CALQ_THP=0)" env CALQ_THP=0 "$CALQ" --version
row "calq --version" "$CALQ" --version
