# Sourced by the GPU machine scripts (gpu_run.sh, gpu_engine_run.sh, gpu_moe_run.sh: each runs as
# DEST/go.sh beside this file, scripts/gpu_bundle.sh) with `here` set to the folder holding
# bundle.tar.xz: unpacks it into $here/x, puts its libraries and the CUDA libraries the machine
# has (the toolkit's, and those of pip's nvidia wheels) on LD_LIBRARY_PATH, and sets SANITIZER to
# compute-sanitizer's path (empty when the machine has none).
mkdir -p "$here/x"
tar -C "$here/x" -xJf "$here/bundle.tar.xz"
cuda_libs=/usr/local/cuda/lib64
for d in /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib /usr/local/lib/python3*/dist-packages/nvidia/*/lib; do
  [ -d "$d" ] && cuda_libs="$cuda_libs:$d"
done
export LD_LIBRARY_PATH="$here/x/lib:$cuda_libs:${LD_LIBRARY_PATH:-}"
export OMP_WAIT_POLICY=passive
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2> /dev/null | head -1)
