#!/usr/bin/env bash
# Tokenizer speed, calq vs Hugging Face `tokenizers` (needs python3 with `tokenizers`).
# Usage: bench/tokenize_bench.sh   (CALQ=path/to/calq and SHARED=../shared may be set)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
if [ -z "${CALQ:-}" ]; then
  cmake --preset release >/dev/null && cmake --build --preset release -j "$(nproc)" --target calq >/dev/null
  CALQ=build/release/calq
fi
exec python3 bench/tokenize_bench.py "$CALQ" "$SHARED/data/wikitext-2-raw/wiki.test.raw" \
  "$SHARED/data/calibration/calibration_datav3.txt" -- \
  "qwen3 (bench-qwen3-16m)=$SHARED/data/models/bench-qwen3-16m" "gpt2=$SHARED/data/tokenizers/gpt2" \
  "llama2 (tokenizer.json)=$SHARED/data/tokenizers/llama2/tokenizer.json"
