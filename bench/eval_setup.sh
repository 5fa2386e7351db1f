# Sourced by the quality benchmarks (bench/quality.sh, moe_quality.sh, mr_gptq_quality.sh), from
# the repository root with W (work directory), SHARED and CHUNKS set: builds calq unless CALQ names
# a binary (or NO_BUILD=1: build/release/calq as it is), points calq's data lookup at WikiText-2
# test and the bartowski v3 calibration text in SHARED (offline), and sets CH, the --chunks
# arguments of every eval.
mkdir -p "$W/data"
if [ -z "${CALQ:-}" ] && [ -z "${NO_BUILD:-}" ]; then
  cmake --preset release >/dev/null
  cmake --build --preset release -j "$(nproc)" --target calq >/dev/null
fi
CALQ=${CALQ:-build/release/calq}
export CALQ_DATA=$W/data CALQ_OFFLINE=1
ln -sf "$(realpath "$SHARED/data/calibration/calibration_datav3.txt")" "$W/data/"
ln -sf "$(realpath "$SHARED/data/wikitext-2-raw/wiki.test.raw")" "$W/data/"
CH=()
if [ -n "$CHUNKS" ]; then CH=(--chunks "$CHUNKS"); fi
