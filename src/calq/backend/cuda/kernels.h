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

// The Hessian accumulator's row gather (hessian_cuda.cpp): dst row i = x[idx[i]]·w[i] (w null:
// x[idx[i]]; the product in fp32, as HessianAccumulator::add_weighted) for i < count, rows of n
// values; dst as fp32, or as bf16 bits rounded to nearest even.
void launch_gather_rows_f32(const float* x, const int64_t* idx, const float* w, float* dst, int64_t count, int64_t n,
                            cudaStream_t stream);
void launch_gather_rows_bf16(const float* x, const int64_t* idx, const float* w, uint16_t* dst, int64_t count,
                             int64_t n, cudaStream_t stream);
// a[j·n + i] = a[i·n + j] for j > i (the row-major upper triangle mirrored into the lower).
void launch_mirror_upper(double* a, int64_t n, cudaStream_t stream);
// a[i] *= s for i < n (one fp64 rounding each, as the host's h[i] *= s); *nonfinite (zeroed by
// the caller) += the number of results that are not finite.
void launch_scale_count_nonfinite(double* a, int64_t n, double s, unsigned int* nonfinite, cudaStream_t stream);
// Power sums of the rows idx[0..count) of x (rows of n values): partial[b·4 + p] = Σ x^(p+1) over
// the elements thread block b visits (fp64), b < power_sum_blocks(); summed on the host in b order.
int power_sum_blocks();
void launch_power_sums(const float* x, const int64_t* idx, int64_t count, int64_t n, double* partial,
                       cudaStream_t stream);

}  // namespace calq::backend::cuda
