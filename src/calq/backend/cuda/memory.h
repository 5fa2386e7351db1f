// calq's own device allocations, counted (backend::cuda_memory_stats in device.h): every
// cudaMalloc / cudaFree of the CUDA backend goes through these, so the report can give the
// high-water mark of what calq held (engine buffers, GPTQ buffers, Hessian accumulators).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

namespace calq::backend::cuda {

// cudaMalloc that counts `bytes` when it succeeds (and samples cudaMemGetInfo for the measured
// peak of the whole device's used memory).
cudaError_t tracked_malloc(void** p, size_t bytes);
// cudaFree of a pointer from tracked_malloc of `bytes` (null: nothing).
void tracked_free(void* p, size_t bytes);

}  // namespace calq::backend::cuda
