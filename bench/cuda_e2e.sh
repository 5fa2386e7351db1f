#!/usr/bin/env bash
# End to end on a CUDA machine: `calq quantize --method METHOD --format FORMAT` of a model with
# --device cpu and with --device cuda (GPTQ, and for dense models the calibration forward passes,
# on the GPU), wall time and peak RSS of each, whether the written safetensors are byte-identical
# and, if not, the share of identical weight codes; each run's GPTQ seconds; then, unless
# CHUNKS=0, the KL divergence of both outputs against the bf16 model on WikiText-2 test (ctx 512,
# the first CHUNKS chunks, all by default) with `calq eval --device EVAL_DEVICE` and their ratio.
# Calibration: bartowski-v3 SAMPLES x 512.
# Usage: bench/cuda_e2e.sh MODEL_DIR [samples (128)] [method (gptq)] [format (int4)]
# Environment: CALQ (a calq binary built with CUDA; default build/release/calq), SHARED, WORK_DIR,
#              CHUNKS, EVAL_DEVICE (cuda), FORWARD_DEVICE (the cuda run's --forward-device; default
#              cuda: the GPU engine; cpu reproduces the CPU run's codes), CUDA_ARGS (more options for
#              the cuda run, e.g. "--forward-precision exact", which is meant to reproduce them on
#              the GPU engine).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bench/cuda_e2e.sh MODEL_DIR [samples] [method] [format]}
SAMPLES=${2:-128}
METHOD=${3:-gptq}
FORMAT=${4:-int4}
SHARED=${SHARED:-../shared}
W=${WORK_DIR:-build/bench-cuda-e2e}
CALQ=${CALQ:-build/release/calq}
CHUNKS=${CHUNKS:-}
EVAL_DEVICE=${EVAL_DEVICE:-cuda}
FORWARD_DEVICE=${FORWARD_DEVICE:-cuda}
CUDA_ARGS=${CUDA_ARGS:-}
mkdir -p "$W/data"
export CALQ_DATA=$W/data CALQ_OFFLINE=1
ln -sf "$(realpath "$SHARED/data/calibration/calibration_datav3.txt")" "$W/data/"
ln -sf "$(realpath "$SHARED/data/wikitext-2-raw/wiki.test.raw")" "$W/data/"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
echo "model: $MODEL; $METHOD $FORMAT; calibration bartowski-v3 ${SAMPLES}x512; cuda run: --forward-device $FORWARD_DEVICE $CUDA_ARGS"
for dev in cpu cuda; do
  /usr/bin/time -f "$dev: wall %e s, peak RSS %M KB" $CALQ -q quantize -i "$MODEL" -o "$W/$dev" --method "$METHOD" \
    --format "$FORMAT" --samples "$SAMPLES" --seq-len 512 --device $dev --forward-device "$([ $dev = cpu ] && echo cpu || echo "$FORWARD_DEVICE")" \
    $([ $dev = cuda ] && echo "$CUDA_ARGS") --overwrite 2>&1 | grep -v "^warning"
done
python3 - "$W" "$FORMAT" <<'PY'
import glob, json, os, struct, sys
import numpy as np
w, fmt = sys.argv[1], sys.argv[2]
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        data = f.read()
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], np.uint8)
            for k, v in hdr.items() if k != "__metadata__"}
# Codes: 4-bit formats (int4 pack-quantized is a little-endian bit stream; fp4/nvfp4/mxfp4/nf4 two
# per byte) are compared nibble by nibble, 8-bit ones byte by byte; int2/int3 byte by byte (a
# lower bound on the share of identical codes).
nib = fmt in ("int4", "fp4", "nvfp4", "mxfp4", "nf4")
same = total = 0
identical_files = True
for fc in sorted(glob.glob(f"{w}/cpu/*.safetensors")):
    fg = f"{w}/cuda/{os.path.basename(fc)}"
    identical_files &= open(fc, "rb").read() == open(fg, "rb").read()
    a, b = tensors(fc), tensors(fg)
    for k in a:
        if not k.endswith("weight_packed"):
            continue
        x, y = a[k], b[k]
        if nib:
            same += int(((x & 15) == (y & 15)).sum() + ((x >> 4) == (y >> 4)).sum())
            total += 2 * x.size
        else:
            same += int((x == y).sum())
            total += x.size
print(f"written safetensors byte-identical: {'yes' if identical_files else 'no'}")
if total:
    print(f"identical weight codes: {same}/{total} = {100.0 * same / total:.4f} %")
for d in ("cpu", "cuda"):
    r = json.load(open(f"{w}/{d}/calq_report.json"))
    mods = r["gptq"]["modules"]
    print(f"{d}: gptq seconds {r['gptq']['seconds']:.1f}, of which GPTQ of the {len(mods)} modules "
          f"{sum(m.get('seconds', 0) for m in mods):.2f}")
PY
[ "$CHUNKS" = 0 ] && exit 0
CH=()
if [ -n "$CHUNKS" ]; then CH=(--chunks "$CHUNKS"); fi
$CALQ -q eval --metric kl-divergence --model "$MODEL" --save-logits "$W/base.logprobs" --device "$EVAL_DEVICE" "${CH[@]}" >/dev/null
for dev in cpu cuda; do
  $CALQ -q eval --metric kl-divergence --model "$W/$dev" --reference-logits "$W/base.logprobs" --device "$EVAL_DEVICE" \
    "${CH[@]}" --json "$W/$dev.kld.json" >/dev/null
done
python3 - "$W" <<'PY'
import json, sys
k = {d: json.load(open(f"{sys.argv[1]}/{d}.kld.json")) for d in ("cpu", "cuda")}
for d in ("cpu", "cuda"):
    print(f"KLD of the --device {d} output: {k[d]['kld_mean']:.6f} (PPL {k[d]['ppl']:.4f}, same top p {100 * k[d]['same_top_p']:.2f} %, {k[d].get('chunks', '?')} chunks)")
print(f"KLD cuda / cpu = {k['cuda']['kld_mean'] / k['cpu']['kld_mean']:.4f}")
PY
