#!/usr/bin/env bash
# Prompt-processing speed of calq's CPU engine against llama.cpp's llama-perplexity, same model,
# same threads, same precision (fp32 weights: calq converts bf16 to fp32; llama.cpp gets an F32
# GGUF made by `calq export`), on WikiText-2 test at ctx 512.
# Models: bench-qwen3-28m (../shared) and a random-weight model with Qwen3-1.7B shapes
# (`calq generate-model`, the bench-qwen3 tokenizer).
# Usage: LLAMA_CPP=/path/to/llama.cpp/build/bin bench/engine_vs_llamacpp.sh [threads] [chunks 28m] [chunks 1.7B]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_CPP:?set LLAMA_CPP to the directory holding llama-perplexity}"
THREADS=${1:-$(nproc)}
CHUNKS_SMALL=${2:-32}   # bench-qwen3-28m
CHUNKS_LARGE=${3:-4}    # Qwen3-1.7B shapes
SHARED=${SHARED:-../shared}
W=${WORK_DIR:-build/bench-engine}
mkdir -p "$W"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target calq >/dev/null
CALQ=build/release/calq
WIKI=$SHARED/data/wikitext-2-raw/wiki.test.raw
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads: $THREADS; ctx 512"
if [ ! -d "$W/qwen3-1.7b-shape" ]; then
  $CALQ -q generate-model -c "$SHARED/data/configs/Qwen3-1.7B" -o "$W/qwen3-1.7b-shape" --seed 0
  cp "$SHARED"/data/models/bench-qwen3-28m/tokenizer*.json "$W/qwen3-1.7b-shape/"
fi
printf '| model | chunks | calq tok/s | llama.cpp tok/s | calq / llama.cpp | calq PPL | llama.cpp PPL |\n|---|---|---|---|---|---|---|\n'
for m in "$SHARED/data/models/bench-qwen3-28m" "$W/qwen3-1.7b-shape"; do
  name=$(basename "$m")
  CHUNKS=$CHUNKS_SMALL
  [ "$name" = qwen3-1.7b-shape ] && CHUNKS=$CHUNKS_LARGE
  [ -f "$W/$name-f32.gguf" ] || $CALQ -q export -i "$m" -o "$W/$name-f32.gguf" --outtype f32
  $CALQ -q --threads "$THREADS" eval --model "$m" --dataset "$WIKI" --ctx 512 --chunks "$CHUNKS" --json "$W/$name-calq.json" >/dev/null
  "$LLAMA_CPP/llama-perplexity" -m "$W/$name-f32.gguf" -f "$WIKI" -c 512 -t "$THREADS" --chunks "$CHUNKS" > "$W/$name-llama.log" 2>&1
  # llama.cpp's log lines start with a timestamp (minutes.seconds.ms.us): compute time is from
  # "calculating perplexity" to "Final estimate".
  lt=$(python3 - "$W/$name-llama.log" "$CHUNKS" <<'PY'
import re, sys
t = {}
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    m = re.match(r"(\d+)\.(\d+)\.(\d+)\.(\d+) ", line)  # minutes.seconds.ms.us
    if not m: continue
    secs = int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6
    if "calculating perplexity" in line: t["start"] = secs
    if "Final estimate" in line:
        t["end"] = secs
        t["ppl"] = float(re.search(r"PPL = ([0-9.]+)", line).group(1))
tok = int(sys.argv[2]) * 512
print(f"{tok / (t['end'] - t['start']):.1f} {t['ppl']:.4f}")
PY
)
  ct=$(python3 -c "import json; d=json.load(open('$W/$name-calq.json')); print(f\"{d['tokens_per_second']:.1f} {d['ppl']:.4f}\")")
  read -r c_tps c_ppl <<<"$ct"
  read -r l_tps l_ppl <<<"$lt"
  ratio=$(python3 -c "print(f'{$c_tps / $l_tps:.2f}')")
  echo "| $name | $CHUNKS | $c_tps | $l_tps | ${ratio}× | $c_ppl | $l_ppl |"
done
