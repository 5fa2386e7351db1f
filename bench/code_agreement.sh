#!/usr/bin/env bash
# How much GPTQ's codes depend on the summation order of fp32 sums, on the CPU alone:
# `calq quantize --method gptq --format int4 --device cpu` of one model several times, changing
# only which kernels compute the products: calq's AVX-512 and AVX2 GEMM kernels (the same order
# by design; the engine's products and the Hessians' block products), OpenBLAS's sgemm instead
# (CALQ_GEMM=blas), OpenBLAS's kernels for other CPU generations (OPENBLAS_CORETYPE=Sandybridge,
# SkylakeX, Haswell: GPTQ's own BLAS calls), one thread. Prints the share of identical int4 codes
# against the first run, per layer and in total. The GPU forward passes' 90 % (docs/cuda.md) is
# the same effect as CALQ_GEMM=blas's.
# Usage: bench/code_agreement.sh [MODEL_DIR (bench-qwen3-16m)] [samples (32)] [seq-len (512)]
# Environment: CALQ (default build/release/calq), SHARED, WORK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
MODEL=${1:-$SHARED/data/models/bench-qwen3-16m}
SAMPLES=${2:-32}
SEQ=${3:-512}
W=${WORK_DIR:-build/bench-code-agreement}
CALQ=${CALQ:-build/release/calq}
mkdir -p "$W/data"
export CALQ_DATA=$W/data CALQ_OFFLINE=1
ln -sf "$(realpath "$SHARED/data/calibration/calibration_datav3.txt")" "$W/data/"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
echo "calq $($CALQ --version | awk '{print $2}'); model: $MODEL; gptq int4 g128; calibration bartowski-v3 ${SAMPLES}x${SEQ}; --device cpu"
echo
runs=("avx512:CALQ_GEMM=avx512" "avx2:CALQ_GEMM=avx2" "blas-gemm:CALQ_GEMM=blas" "openblas-sandybridge:OPENBLAS_CORETYPE=Sandybridge"
      "openblas-skylakex:OPENBLAS_CORETYPE=SkylakeX" "openblas-haswell:OPENBLAS_CORETYPE=Haswell" "one-thread:OMP_NUM_THREADS=1")
if ! grep -q avx512f /proc/cpuinfo; then  # no AVX-512: neither calq's AVX-512 kernel nor OpenBLAS's SkylakeX ones
  runs=("${runs[@]:1:3}" "${runs[@]:5}")
fi
names=()
for r in "${runs[@]}"; do
  name=${r%%:*}
  env "${r#*:}" $CALQ -q quantize -i "$MODEL" -o "$W/$name" --method gptq --format int4 --samples "$SAMPLES" \
    --seq-len "$SEQ" --device cpu --overwrite 2>&1 | grep -v "^warning" || true
  names+=("$name=${r#*:}")
done
python3 - "$W" "${names[@]}" <<'PY'
import json, struct, sys
w, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
def codes(d):
    with open(f"{w}/{d}/model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        data = f.read()
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in hdr.items() if k.endswith("weight_packed")}
ref_name = runs[0][0]
ref = codes(ref_name)
layers = sorted({int(k.split(".")[2]) for k in ref})
print(f"| run (against {ref_name}) | setting | identical int4 codes | " + " | ".join(f"layer {l}" for l in layers) + " |")
print("|---|---|---:|" + "---:|" * len(layers))
for name, setting in runs[1:]:
    got = codes(name)
    per = {l: [0, 0] for l in layers}
    for k, a in ref.items():
        b = got[k]
        same = sum(((x & 15) == (y & 15)) + ((x >> 4) == (y >> 4)) for x, y in zip(a, b))
        l = int(k.split(".")[2])
        per[l][0] += same
        per[l][1] += 2 * len(a)
    s = sum(v[0] for v in per.values()); t = sum(v[1] for v in per.values())
    print(f"| {name} | `{setting}` | {100 * s / t:.4f} % | " + " | ".join(f"{100 * v[0] / v[1]:.2f}" for v in per.values()) + " |")
PY
