#!/usr/bin/env bash
# Prompt-processing speed of calq's CPU engine against llama.cpp's llama-perplexity, same model,
# same threads, same precision (fp32 weights: calq converts bf16 to fp32; llama.cpp gets an F32
# GGUF made by `calq export`), on WikiText-2 test at ctx 512.
# Models: bench-qwen3-28m (../shared) and a random-weight model with Qwen3-1.7B shapes
# (`calq generate-model`, the bench-qwen3 tokenizer).
# Usage: LLAMA_CPP=/path/to/llama.cpp/build/bin bench/engine_vs_llamacpp.sh [threads] [chunks 28m] [chunks 1.7B]
# REPEATS=n (default 1) alternates calq and llama.cpp n times per model (calq, llama.cpp, calq, ...)
# and reports the median and the best tokens/s of each, and the median of the per-pair ratios;
# MODELS="28m 1.7b" (default both) picks the models; CALQ=binary skips the build; RANDOM_28M=1
# replaces bench-qwen3-28m's weights by random ones from its config.json (same shapes and speed;
# for a machine that has the config and tokenizer but not the checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_CPP:?set LLAMA_CPP to the directory holding llama-perplexity}"
THREADS=${1:-$(nproc)}
CHUNKS_SMALL=${2:-32}   # bench-qwen3-28m
CHUNKS_LARGE=${3:-4}    # Qwen3-1.7B shapes
REPEATS=${REPEATS:-1}
MODELS=${MODELS:-28m 1.7b}
SHARED=${SHARED:-../shared}
W=${WORK_DIR:-build/bench-engine}
mkdir -p "$W"
if [ -z "${CALQ:-}" ]; then  # CALQ: a calq binary (skips the build)
  cmake --preset release >/dev/null
  cmake --build --preset release -j "$(nproc)" --target calq >/dev/null
  CALQ=build/release/calq
fi
WIKI=$SHARED/data/wikitext-2-raw/wiki.test.raw
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads: $THREADS; ctx 512"
if [[ " $MODELS " == *" 1.7b "* ]] && [ ! -d "$W/qwen3-1.7b-shape" ]; then
  $CALQ -q generate-model -c "$SHARED/data/configs/Qwen3-1.7B" -o "$W/qwen3-1.7b-shape" --seed 0
  cp "$SHARED"/data/models/bench-qwen3-28m/tokenizer*.json "$W/qwen3-1.7b-shape/"
fi
M28=$SHARED/data/models/bench-qwen3-28m
if [ "${RANDOM_28M:-0}" = 1 ]; then
  if [ ! -d "$W/bench-qwen3-28m" ]; then
    mkdir -p "$W/cfg28" && cp "$M28/config.json" "$W/cfg28/"
    $CALQ -q generate-model -c "$W/cfg28" -o "$W/bench-qwen3-28m" --seed 0
    cp "$M28"/tokenizer*.json "$W/bench-qwen3-28m/"
  fi
  M28=$W/bench-qwen3-28m
fi
printf '| model | chunks | runs | calq tok/s median (best) | llama.cpp tok/s median (best) | calq / llama.cpp median (range) | calq PPL | llama.cpp PPL |\n|---|---|---|---|---|---|---|---|\n'
for m in "$M28" "$W/qwen3-1.7b-shape"; do
  name=$(basename "$m")
  CHUNKS=$CHUNKS_SMALL
  [ "$name" = qwen3-1.7b-shape ] && CHUNKS=$CHUNKS_LARGE
  case "$name" in bench-qwen3-28m) key=28m ;; *) key=1.7b ;; esac
  case " $MODELS " in *" $key "*) ;; *) continue ;; esac
  [ -f "$W/$name-f32.gguf" ] || $CALQ -q export -i "$m" -o "$W/$name-f32.gguf" --outtype f32
  runs=()
  for r in $(seq "$REPEATS"); do
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
    echo "run $r $name: calq $ct, llama.cpp $lt" >&2
    runs+=("$ct $lt")
  done
  printf '%s\n' "${runs[@]}" | python3 -c "
import statistics as st, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
c = [r[0] for r in rows]; l = [r[2] for r in rows]; q = [a / b for a, b in zip(c, l)]
print(f'| $name | $CHUNKS | {len(rows)} | {st.median(c):.1f} ({max(c):.1f}) | {st.median(l):.1f} ({max(l):.1f}) | '
      f'{st.median(q):.2f}× ({min(q):.2f}–{max(q):.2f}) | {rows[-1][1]:.4f} | {rows[-1][3]:.4f} |')
"
done
