#!/usr/bin/env bash
# Issue 9's end-to-end speed bar on one GPU: GPTQ int4 g128 of a random-weight model of Qwen3-8B's
# shapes, from safetensors to written output, calq (`quantize --device cuda`) against the original
# GPTQ code (IST-DASLab/gptq with transformers, layer by layer: bench/gptq_ref_llm.py) in the same
# call, same GPU, shapes, calibration tokens and recipe (true-sequential, quantized inputs,
# symmetric, damp 0.01, block 128, no act-order). Prints a markdown table: time per stage of both,
# the end-to-end ratio, peak GPU memory of both, the GPU's measured GEMM peaks (torch matmul,
# 8192^3) and the achieved rate of the Hessian GEMMs.
#
# Calibration: wikitext2:test (SHARED/data/wikitext-2-raw/wiki.test.raw), tokenized by calq with
# TOKENIZER (default bench-qwen3-28m's 8192-token BPE; the random model does not care which ids it
# gets, and for speed only the shapes count), SAMPLES consecutive windows of SEQ tokens: calq's
# `--calibration wikitext2:test` packing; the reference reads the same ids from `calq tokenize`.
#
# Usage: GPTQ_REPO=/path/to/gptq bench/cuda_speed.sh
# Environment: CALQ (calq built with CUDA; build/release/calq), PYTHON (python3 with torch +
#   transformers), SHARED (../shared), CONFIG (a config.json or its folder; Qwen3-8B's), LAYERS
#   (num_hidden_layers override; default the config's), SAMPLES (128), SEQ (2048), MODEL (use this
#   checkpoint instead of generating one), TOKENIZER, WORK_DIR (build/bench-cuda-speed), T_REF and
#   T_CALQ (time limits in seconds of each side, default 3000), RUN (both | ref | calq), GEMM_PEAK
#   (1: measure the GEMM peaks; 0: skip), CALQ_ARGS (more `calq quantize` options, e.g.
#   "--forward-precision bf16 --hessian-precision tf32").
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$here/../../shared}
CALQ=${CALQ:-$here/../build/release/calq}
PY=${PYTHON:-python3}
: "${GPTQ_REPO:?set GPTQ_REPO to a checkout of IST-DASLab/gptq}"
CONFIG=${CONFIG:-$SHARED/data/configs/Qwen3-8B}
TOKENIZER=${TOKENIZER:-$SHARED/data/models/bench-qwen3-28m}
WIKI=${WIKI:-$SHARED/data/wikitext-2-raw/wiki.test.raw}
SAMPLES=${SAMPLES:-128}
SEQ=${SEQ:-2048}
W=${WORK_DIR:-build/bench-cuda-speed}
RUN=${RUN:-both}
mkdir -p "$W/data"
W=$(cd "$W" && pwd)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

echo "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1);" \
  "$(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
model=${MODEL:-}
if [ -z "$model" ]; then
  model=$W/model
  t0=$(now)
  "$CALQ" -q generate-model -c "$CONFIG" -o "$model" --seed 0 --dtype bf16 --overwrite ${LAYERS:+--layers "$LAYERS"} || exit 1
  echo "generated $model in $(since "$t0") s ($(du -sh "$model" | cut -f1))"
fi
cp "$TOKENIZER"/tokenizer*.json "$model/" 2> /dev/null
ln -sf "$(realpath "$WIKI")" "$W/data/wiki.test.raw"
"$CALQ" -q tokenize --tokenizer "$TOKENIZER" --input "$WIKI" --output "$W/ids.bin" --format bin > /dev/null || exit 1

if [ "${GEMM_PEAK:-1}" = 1 ]; then
  "$PY" - > "$W/gemm_peak.json" <<'PY' || echo "GEMM peak measurement failed"
import json, time, torch
n, res = 8192, {}
for name, dt, tf32 in [("fp64", torch.float64, False), ("fp32", torch.float32, False), ("tf32", torch.float32, True),
                       ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda", dtype=dt); b = torch.randn(n, n, device="cuda", dtype=dt)
    for _ in range(2): a @ b
    torch.cuda.synchronize(); reps = 3 if dt == torch.float64 else 10
    t = time.perf_counter()
    for _ in range(reps): a @ b
    torch.cuda.synchronize()
    res[name] = 2.0 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
torch.backends.cuda.matmul.allow_tf32 = False
print(json.dumps(res))
PY
fi

if [ "$RUN" != calq ]; then
  echo "== reference: IST-DASLab/gptq llama_sequential recipe on $model, ${SAMPLES}x$SEQ"
  t0=$(now)
  timeout "${T_REF:-3000}" "$PY" "$here/gptq_ref_llm.py" --gptq-repo "$GPTQ_REPO" --model "$model" --tokens "$W/ids.bin" \
    --samples "$SAMPLES" --seq-len "$SEQ" --out "$W/ref-out" --json "$W/ref.json" > "$W/ref.log" 2>&1
  rc=$?
  since "$t0" > "$W/ref.wall"; echo $rc > "$W/ref.rc"
  echo "reference rc=$rc, wall $(cat "$W/ref.wall") s"; grep -E "^(layer|transformers)" "$W/ref.log"
  [ $rc = 0 ] || tail -20 "$W/ref.log"
fi

if [ "$RUN" != ref ]; then
  echo "== calq quantize --device cuda ${CALQ_ARGS:-} on $model, ${SAMPLES}x$SEQ"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1 > "$W/calq.mem_base"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/calq.mem" 2> /dev/null &
  smi=$!
  t0=$(now)
  CALQ_DATA=$W/data CALQ_OFFLINE=1 timeout "${T_CALQ:-3000}" "$CALQ" quantize -i "$model" -o "$W/calq-out" \
    --method gptq --format int4 --group-size 128 --device cuda --samples "$SAMPLES" --seq-len "$SEQ" \
    --calibration wikitext2:test --overwrite ${CALQ_ARGS:-} > "$W/calq.log" 2>&1
  rc=$?
  since "$t0" > "$W/calq.wall"; echo $rc > "$W/calq.rc"
  kill "$smi" 2> /dev/null; wait "$smi" 2> /dev/null
  echo "calq rc=$rc, wall $(cat "$W/calq.wall") s"; grep -vE "^warning" "$W/calq.log" | tail -8
fi

"$PY" - "$W" "$model" "$SAMPLES" "$SEQ" <<'PY'
import json, os, sys
w, model, samples, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def load(p):
    try:
        return json.load(open(os.path.join(w, p)))
    except Exception:
        return None
def num(p):
    try:
        return float(open(os.path.join(w, p)).read().split()[0])
    except Exception:
        return None
cfg = json.load(open(os.path.join(model, "config.json")))
H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
q = cfg["num_attention_heads"] * cfg.get("head_dim", H // cfg["num_attention_heads"])
tokens = samples * seq
# Hessian per distinct module input (syrk: tokens * cols^2 flops, the upper triangle's multiply-adds, as
# is usual for syrk): q/k/v share the input, gate/up share one, o and down have their own.
syrk = tokens * (2 * H * H + q * q + I * I) * L
peak, ref, rep = load("gemm_peak.json"), load("ref.json"), load("calq-out/calq_report.json")
if num("ref.rc") not in (None, 0):
    ref = None
if num("calq.rc") not in (None, 0):
    rep = None
ref_wall = num("ref.wall") if num("ref.rc") == 0 else None
calq_wall = num("calq.wall") if num("calq.rc") == 0 else None
for side in ("ref", "calq"):
    if num(side + ".rc") not in (None, 0):
        print(f"{side}: exit status {num(side + '.rc'):.0f} (124: stopped by its time limit after {num(side + '.wall'):.0f} s)")
f = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"
print(f"\nmodel: {model}: {L} layers (hidden {H}, q {q}, intermediate {I}, vocab {cfg['vocab_size']}); "
      f"calibration {samples} x {seq} = {tokens} tokens; GPTQ int4 g128 symmetric, true-sequential, damp 0.01, block 128")
if peak:
    print("GPU GEMM peak (torch matmul 8192^3, TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
rs = ref["stages_s"] if ref else {}
cs, gst, gg = {}, {}, {}
if rep:
    g = rep.get("gptq", {})
    gst = g.get("stages") or {}
    gg = gst.get("gptq_cuda") or {}
    cs = {"write": rep.get("seconds"), "layer_loop": g.get("seconds")}
    if calq_wall is not None and cs["layer_loop"] is not None:
        cs["load+setup"] = calq_wall - cs["layer_loop"] - (cs["write"] or 0.0)
    cs["forward"] = gst.get("calibration_forward")
    cs["hessian_gpu"] = gst.get("hessian_accumulate_gpu")
    cs["hessian"] = (gst.get("hessian_accumulate") or 0.0) + (gst.get("hessian_finalize") or 0.0) if gst else None
    cs["quantize"] = gst.get("quantize")
    cs["other"] = gst.get("other")
    for k in ("load_model", "calibration_text", "calibration_embed", "output_forward", "checkpoint"):
        cs[k] = gst.get(k)
    fact = sum(v for k, v in gg.items() if any(w in k for w in ("factor", "chol", "inverse", "damp")))
    loop = sum(v for k, v in gg.items() if any(w in k for w in ("block", "lazy", "loop")))
    cs["factorization"] = fact if gg else None
    cs["gptq_loop"] = loop if gg else None
print()
print("| stage | reference (s) | calq --device cuda (s) |")
print("|---|---:|---:|")
print(f"| load checkpoint (reference) / process start, plan, before the layer loop (calq) | {f(rs.get('load'))} | {f(cs.get('load+setup'))} |")
print(f"| forward passes (reference: catch + 5 passes per layer; calq: observation passes, wall) | {f(rs.get('forward'))} | "
      f"{f(cs.get('forward'))} |")
print(f"| Hessian accumulation (reference: GPU fp32 matmul per module; calq: host side + finalization; GPU time) | "
      f"{f(rs.get('hessian'))} | {f(cs.get('hessian'))} ({f(cs.get('hessian_gpu'))} GPU) |")
print(f"| GPTQ per module, wall (calq: host preparation, uploads, GPU work) | {f((rs.get('factorization') or 0) + (rs.get('gptq_loop') or 0) if rs else None)} | {f(cs.get('quantize'))} |")
print(f"| of which factorization (Cholesky, inverse) | {f(rs.get('factorization'))} | {f(cs.get('factorization'))} |")
print(f"| of which column loop + lazy updates | {f(rs.get('gptq_loop'))} | {f(cs.get('gptq_loop'))} |")
print(f"| calq: model load (onto the GPU) | — | {f(cs.get('load_model'))} |")
print(f"| calq: calibration text, embedding and upload | — | {f((cs.get('calibration_text') or 0) + (cs.get('calibration_embed') or 0) if cs.get('calibration_embed') is not None else None)} |")
print(f"| calq: output pass of each layer | — | {f(cs.get('output_forward'))} |")
print(f"| calq: checkpoints | — | {f(cs.get('checkpoint'))} |")
print(f"| layer moves host<->GPU (reference) / the rest (calq) | {f(rs.get('transfer'))} | {f(cs.get('other'))} |")
print(f"| writing | {f(rs.get('write'))} | {f(cs.get('write'))} |")
print(f"| **end to end (process wall)** | **{f(ref_wall, 1)}** | **{f(calq_wall, 1)}** |")
pm = None
if rep and (rep.get("gpu") or {}).get("peak_bytes"):
    pm = rep["gpu"]["peak_bytes"] / 2**30
    src = "calq_report gpu.peak_bytes: calq's own allocations"
    if rep["gpu"].get("measured_peak_used_bytes"):
        src += f"; {rep['gpu']['measured_peak_used_bytes'] / 2**30:.2f} GiB used on the device at most"
else:
    try:
        base = num("calq.mem_base")
        vals = [float(x) for x in open(os.path.join(w, "calq.mem")).read().split() if x.strip()]
        pm = (max(vals) - base) / 1024 if vals else None
        src = "nvidia-smi memory.used, max over 100 ms samples minus the value before the run"
    except Exception:
        src = "not measured"
ref_pm = ref["peak_gpu_allocated_bytes"] / 2**30 if ref else None
ref_pr = ref["peak_gpu_reserved_bytes"] / 2**30 if ref else None
print(f"| peak GPU memory (GiB) | {f(ref_pm)} allocated, {f(ref_pr)} reserved | {f(pm)} ({src}) |")
if ref_wall and calq_wall:
    print(f"\nend to end: reference {ref_wall:.1f} s / calq {calq_wall:.1f} s = **{ref_wall / calq_wall:.2f}x** (bar: >= 5x)")
if gst:
    print("calq_report gptq.stages: " + json.dumps(gst))
if ref and rs.get("hessian"):
    ex = ref["hessian_flops"]
    print(f"reference Hessian GEMMs: {ex / 1e12:.1f} TFLOP executed (full square per module, q/k/v and gate/up each "
          f"their own) in {rs['hessian']:.2f} s = {ex / rs['hessian'] / 1e12:.1f} TFLOP/s"
          + (f" ({100 * ex / rs['hessian'] / 1e12 / peak['fp32']:.0f} % of the measured fp32 peak)" if peak else "")
          + f"; syrk-equivalent work per distinct input {syrk / 1e12:.1f} TFLOP -> {syrk / rs['hessian'] / 1e12:.1f} TFLOP/s")
    print(f"reference lazy-update GEMMs: {ref['update_flops'] / 1e12:.2f} TFLOP (fp32) inside the GPTQ loop stage "
          f"({rs.get('gptq_loop', 0):.2f} s, not timed alone)")
if cs.get("hessian_gpu"):
    prec = (rep.get("gptq") or {}).get("hessian_precision", "fp32")
    r = syrk / cs["hessian_gpu"] / 1e12
    pk = (peak or {}).get("fp32" if prec == "fp32" else prec)
    print(f"calq Hessian GEMMs ({prec} block products, fp64 sums): {syrk / 1e12:.1f} TFLOP of syrk in "
          f"{cs['hessian_gpu']:.2f} s of GPU time = {r:.1f} TFLOP/s" + (f" ({100 * r / pk:.0f} % of the measured {prec} GEMM peak)" if pk else ""))
if gg.get("gemm_flops") and gg.get("lazy_gemm"):
    r = gg["gemm_flops"] / gg["lazy_gemm"] / 1e12
    pk = (peak or {}).get("fp64")
    print(f"calq lazy-update GEMMs (fp64): {gg['gemm_flops'] / 1e12:.2f} TFLOP in {gg['lazy_gemm']:.2f} s = {r:.1f} TFLOP/s"
          + (f" ({100 * r / pk:.0f} % of the measured fp64 peak)" if pk else ""))
PY
