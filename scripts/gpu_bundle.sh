#!/bin/bash
# Packs the CUDA build's GPU test and bench binaries with the shared libraries they need that a
# CUDA machine may lack (everything ldd resolves outside glibc, libstdc++/libgcc and CUDA's own
# cuBLAS/cuSOLVER, which the CUDA machine has) into DEST/bundle.tar.xz, plus bench/gpu_run.sh as
# DEST/go.sh (or RUN_SCRIPT, e.g. bench/gpu_engine_run.sh) and bench/gpu_env.sh, which go.sh sources. Usage: scripts/gpu_bundle.sh BUILD_DIR DEST [RUN_SCRIPT]
set -euo pipefail
build=$1 dest=$2
src=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
mkdir -p "$tmp/bin" "$tmp/lib" "$dest"
bins=("$build/tests/cuda_backend_test" "$build/bench/gptq_cuda_tool" "$build/calq")
[ -f "$build/tests/engine_cuda_test" ] && bins+=("$build/tests/engine_cuda_test")
cp "${bins[@]}" "$tmp/bin/"
for b in "${bins[@]}"; do
  ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
    libcublas*|libcusolver*|libcudart*|libcusparse*|libnvJitLink*) ;;
    *) cp -L "$lib" "$tmp/lib/" ;;
  esac
done
tar -C "$tmp" -cJf "$dest/bundle.tar.xz" bin lib
cp "$src/${3:-bench/gpu_run.sh}" "$dest/go.sh"
cp "$src/bench/gpu_env.sh" "$dest/gpu_env.sh"  # sourced by go.sh
rm -rf "$tmp"
du -sh "$dest"/*
