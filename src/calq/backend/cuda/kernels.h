// The CUDA kernels of the GPTQ/Hessian backend (kernels.cu), launched on `stream`. Plain C++
// declarations so that host code compiled by the C++ compiler can call them.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace calq::backend::cuda {

// sum[i·n + j] += tmp[i·n + j] for j >= i (row-major upper triangle; fp32 → fp64).
void launch_add_upper_f32_to_f64(const float* tmp, double* sum, int64_t n, cudaStream_t stream);
// b = P·a·P (index reversal of rows and columns), n×n.
void launch_reverse(const double* a, double* b, int64_t n, cudaStream_t stream);
// a[i·n + i] += lambda.
void launch_add_diagonal(double* a, int64_t n, double lambda, cudaStream_t stream);
// u (row-major upper) from the column-major lower L⁻¹ in b: u[i·n + j] = b[(n-1-i) + (n-1-j)·n]
// for j >= i, 0 below the diagonal.
void launch_reversed_lower_to_upper(const double* b, double* u, int64_t n, cudaStream_t stream);
// For tests of the error path (CALQ_TEST_CUDA_FAULT): a launch with an invalid configuration
// (more threads per block than any GPU allows), so that the next cudaGetLastError() returns a
// real CUDA error.
void launch_invalid_for_test(cudaStream_t stream);

}  // namespace calq::backend::cuda
