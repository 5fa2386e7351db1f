#!/usr/bin/env bash
# Checks that calq/engine/fast_exp.h (shared by the CPU engine and the GPU exact mode since
# commit 93a4ea9, hexadecimal constants) returns the same bits as the CPU engine's fast_exp before
# it moved there (engine.h at commit 2ccef7c, decimal constants), for all 2^32 float inputs (NaN
# payloads aside). Needs the repository's git history and g++. Prints the machine and the count.
# Usage: bench/fast_exp_bits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
git show 2ccef7c:src/calq/engine/engine.h | sed -n '/^inline float fast_exp(float x) {/,/^}/p' |
  sed 's/inline float fast_exp/inline float old_fast_exp/' > "$W/old.h"
[ -s "$W/old.h" ] || { echo "could not read the old fast_exp from commit 2ccef7c" >&2; exit 1; }
cat > "$W/check.cpp" <<'CPP'
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include "calq/engine/fast_exp.h"
#include "old.h"
int main() {
  uint64_t differ = 0;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); ++u) {
    const uint32_t b = static_cast<uint32_t>(u);
    float x;
    std::memcpy(&x, &b, 4);
    const float a = old_fast_exp(x), c = calq::engine::fast_exp(x);
    if (std::memcmp(&a, &c, 4) != 0 && !(a != a && c != c)) ++differ;
  }
  std::printf("fast_exp.h vs the 2ccef7c fast_exp: %llu of 4294967296 inputs differ\n",
              static_cast<unsigned long long>(differ));
  return differ != 0;
}
CPP
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), g++ $(g++ -dumpversion)"
for flags in "-O2 -ffp-contract=off" "-O2 -ffp-contract=off -march=native"; do
  g++ -std=c++20 $flags -I src -I "$W" "$W/check.cpp" -o "$W/check"
  echo "flags: $flags"
  "$W/check"
done
