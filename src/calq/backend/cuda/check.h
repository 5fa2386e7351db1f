// Error checks of the CUDA backend's runtime, cuBLAS and cuSOLVER calls (host code): a failure
// throws calq::Error naming the step and the library's own message or status.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "calq/backend/cuda/libs.h"
#include "calq/core/error.h"

namespace calq::backend::cuda {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in {}: {} ({})", what, cudaGetErrorString(e), cudaGetErrorName(e));
}
inline void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error in {}: status {}", what, static_cast<int>(s));
}
inline void check_cusolver(cusolverStatus_t s, const char* what) {
  if (s != CUSOLVER_STATUS_SUCCESS) fail("cuSOLVER error in {}: status {}", what, static_cast<int>(s));
}

}  // namespace calq::backend::cuda
