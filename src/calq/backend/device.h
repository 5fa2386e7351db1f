// The compute device of calq's quantization kernels: the CPU (the reference, always built) or a
// CUDA GPU (built when CMake finds the CUDA toolkit, CALQ_CUDA=AUTO|ON; src/calq/backend/cuda/).
// Every function here exists in every build: without CUDA the cuda_* ones throw calq::Error with
// a message saying that this calq was built without CUDA and what to do.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "calq/quant/gptq.h"
#include "calq/quant/hadamard.h"

namespace calq::backend {

enum class Device { Cpu, Cuda };

// "cpu" | "cuda"; anything else throws calq::Error naming `option` and the value.
Device parse_device(std::string_view name, std::string_view option = "--device");

// Whether this binary was built with the CUDA backend.
bool cuda_built();

// Checks that the CUDA backend can run here: built with CUDA, a GPU visible, compute capability
// >= 8.0. Throws calq::Error naming `option` otherwise; returns a description of device 0
// ("NVIDIA H200, sm_90, 139.8 GiB").
std::string cuda_require(std::string_view option = "--device cuda");

// The GPU ordinals of a device list such as "0,1" (--devices): each must be a visible GPU of compute
// capability >= 8.0; an ordinal may repeat (two workers on one GPU). Throws calq::Error naming
// `option` otherwise.
std::vector<int> cuda_parse_devices(std::string_view list, std::string_view option = "--devices");

// Free memory of the calling thread's current GPU in bytes (cudaMemGetInfo); 0 without CUDA or a
// GPU.
uint64_t cuda_free_bytes();

// Makes `device` the calling thread's current CUDA device for the scope's lifetime (the previous
// one is restored at exit). A no-op for device < 0 and in builds without CUDA.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(int device);
  ~CudaDeviceScope();
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// Σ xᵀx over the rows of x (rows × features, row-major) whose mask is non-zero (mask may be
// null), on the GPU, with the CPU HessianAccumulator's arithmetic: fp32 SYRK products over
// blocks of at most `block` rows, each added into an fp64 sum. Full symmetric result, row-major;
// `tokens` receives the number of rows used.
std::vector<double> cuda_hessian_sum(const float* x, int64_t rows, int64_t features, const uint8_t* mask,
                                     int64_t block, int64_t* tokens);

// quant::gptq_quantize on the GPU (opt.cuda is ignored): same algorithm, same fp64 arithmetic,
// same group-parameter and element code (the CPU format functions). See docs/cuda.md.
quant::GptqResult cuda_gptq_quantize(const float* w, int64_t rows, int64_t cols, const std::vector<double>& h,
                                     const quant::Format& f, const quant::GptqOptions& opt, const std::string& what);

// quant::Rotation::apply_rows (inverse: apply_rows_inverse) of x (rows × r.dim, host memory, in
// place) on the GPU: signs, then a fast Walsh–Hadamard transform of each block in shared memory
// with the CPU's butterflies and scaling, so the result is bit-identical to the CPU's.
// Power-of-two blocks of 2..8192 (fp32) or 2..4096 (fp64) — block Hadamard 16..256, or a
// full-width power-of-two dim; a full-width matrix of another order (r.full) throws.
void cuda_hadamard_rows(const quant::Rotation& r, float* x, int64_t rows, bool inverse);
void cuda_hadamard_rows(const quant::Rotation& r, double* x, int64_t rows, bool inverse);
// quant::Rotation::apply_hessian (H ← RᵀHR, h is r.dim × r.dim) on the GPU, bit-identical to the
// CPU's; the same blocks as the fp64 cuda_hadamard_rows.
void cuda_rotate_hessian(const quant::Rotation& r, std::vector<double>& h);
// Whether cuda_rotate_hessian / the fp32 and fp64 cuda_hadamard_rows take this rotation.
bool cuda_hadamard_supported(const quant::Rotation& r);

}  // namespace calq::backend
