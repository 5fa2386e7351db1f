// Counters behind backend::cuda_memory_stats (memory.h).
#include "calq/backend/cuda/memory.h"

#include <algorithm>
#include <mutex>

#include "calq/backend/device.h"

namespace calq::backend {

namespace {

std::mutex g_mu;
size_t g_current = 0, g_peak = 0, g_allocs = 0;
size_t g_used_peak = 0, g_total = 0;  // cudaMemGetInfo: total − free, sampled at allocations

void sample_used() {  // under g_mu
  size_t f = 0, t = 0;
  if (cudaMemGetInfo(&f, &t) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  g_total = t;
  g_used_peak = std::max(g_used_peak, t - f);
}

}  // namespace

namespace cuda {

cudaError_t tracked_malloc(void** p, size_t bytes) {
  const cudaError_t e = cudaMalloc(p, std::max<size_t>(bytes, 1));
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(g_mu);
  g_current += bytes;
  g_peak = std::max(g_peak, g_current);
  ++g_allocs;
  sample_used();
  return e;
}

void tracked_free(void* p, size_t bytes) {
  if (!p) return;
  cudaFree(p);
  std::lock_guard<std::mutex> lock(g_mu);
  g_current -= std::min(g_current, bytes);
}

}  // namespace cuda

GpuMemoryStats cuda_memory_stats() {
  GpuMemoryStats s;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_allocs == 0) return s;
  sample_used();
  s.used = true;
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) == cudaSuccess) s.device = p.name;
  else cudaGetLastError();
  s.peak_bytes = static_cast<int64_t>(g_peak);
  s.current_bytes = static_cast<int64_t>(g_current);
  s.total_bytes = static_cast<int64_t>(g_total);
  s.measured_peak_used_bytes = static_cast<int64_t>(g_used_peak);
  s.allocations = static_cast<int64_t>(g_allocs);
  return s;
}

}  // namespace calq::backend
