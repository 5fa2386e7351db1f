// The compute device of calq's quantization kernels: the CPU (the reference, always built) or a
// CUDA GPU (built when CMake finds the CUDA toolkit, CALQ_CUDA=AUTO|ON; src/calq/backend/cuda/).
// Every function here exists in every build: without CUDA the cuda_* ones throw calq::Error with
// a message saying that this calq was built without CUDA and what to do.
#pragma once

#include <cstdint>
#include <memory>
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
// null), on the GPU, with the CPU HessianAccumulator's precision and blocks: fp32 SYRK products over
// blocks of at most `block` rows (cuBLAS's order of the sums), each added into an fp64 sum. Full symmetric result, row-major;
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

// Input precision of GpuHessian's block products: F32 = cublasSsyrk in fp32 (the CPU
// HessianAccumulator's precision and blocks), TF32 = fp32 inputs rounded to TF32 on the tensor cores, BF16
// = inputs rounded to bf16; every block product accumulates in fp32 and is added into an fp64 sum.
// Exact = F32 with each element of a block product computed as the CPU computes it (one fp32 FMA
// chain over the block's rows in order, cuda/exact_kernels.h): the CPU accumulator's bits.
enum class HessianPrecision { F32, TF32, BF16, Exact };
// "fp32" | "tf32" | "bf16" | "exact"; anything else throws calq::Error naming `option` and the value.
HessianPrecision parse_hessian_precision(std::string_view name, std::string_view option = "--hessian-precision");
const char* hessian_precision_name(HessianPrecision p);

// quant::HessianAccumulator on GPU 0: Σ xᵀx of a linear module's input rows in fp64 on the
// device, from block products of at most `block` rows (the rows are gathered into a device
// buffer, padding rows left out), and hessian() = Σ / weight() as a full symmetric host matrix,
// the CPU accumulator's contract. block 0 = default_block(features, precision): for F32 and Exact the
// CPU's 512-row blocks (the same arithmetic); for TF32 / BF16 up to 8192 rows (fewer fp64
// additions; the fp32 accumulation of 8192 rounded products stays far below the input rounding). Without CUDA the constructor throws
// the "built without CUDA" error. Not thread-safe per object; objects share one stream and one
// cuBLAS handle (guarded by a lock).
class GpuHessian {
 public:
  explicit GpuHessian(int64_t features, HessianPrecision precision = HessianPrecision::F32, int64_t block = 0);
  // The rows of one block product when the constructor's block is 0: 512 for F32 and Exact; for TF32 /
  // BF16 the largest multiple of 512 up to 8192 whose row buffer stays within 256 MiB (≥ 512).
  static int64_t default_block(int64_t features, HessianPrecision precision);
  GpuHessian(GpuHessian&&) noexcept;
  GpuHessian& operator=(GpuHessian&&) noexcept;
  ~GpuHessian();
  // x_device: rows × features fp32 row-major on GPU 0. mask (host, rows bytes; null: every row):
  // rows with mask 0 are left out. weight (host, rows floats; null: unweighted): row r counts as
  // x·weight[r] (its square in the sum, as HessianAccumulator::add_weighted; finite and >= 0).
  // stream (a cudaStream_t; null: none): x is valid in stream order — the reads are ordered
  // after the work already on it, and later work on it waits for them; with null, x must be
  // ready and add returns after reading it.
  void add(const float* x_device, int64_t rows, const uint8_t* mask = nullptr, const float* weight = nullptr,
           void* stream = nullptr);
  // The same for rows in host memory.
  void add_host(const float* x, int64_t rows, const uint8_t* mask = nullptr, const float* weight = nullptr);
  int64_t features() const;
  int64_t tokens() const;
  double weight() const;  // Σ w² (tokens() when no weights were given)
  HessianPrecision precision() const;
  // Σ / weight() (full symmetric, row-major, fp64) on the host; zero matrix when nothing was added.
  std::vector<double> hessian() const;
  // Σ / weight() finished in place on the GPU, for GPTQ on the GPU to read without a host round
  // trip (quant::GptqOptions::hessian_device): the same values as hessian(), bit for bit, at
  // `data` (n × n, symmetric) on GPU `device`, with the diagonal and whether every entry is
  // finite copied to the host. After this the accumulator is finished: add() fails, hessian()
  // still downloads. data = null (and an empty diagonal) when nothing was added.
  struct OnDevice {
    const double* data = nullptr;
    int device = 0;
    std::vector<double> diag;
    bool finite = true;
  };
  OnDevice finish_on_device();
  // GPU time of the accumulation so far (seconds, CUDA events around each add's gathers and products).
  double gpu_seconds() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Power sums Σx, Σx², Σx³, Σx⁴ (fp64) over every element of the rows of x_device (rows × cols fp32
// on GPU 0, valid in `stream` order as for GpuHessian::add) whose host mask is non-zero, and the
// element count: the GPU twin of pipeline::MomentAccumulator::add (MR-GPTQ's kurtosis).
struct PowerSums {
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  int64_t n = 0;
};
PowerSums cuda_power_sums(const float* x_device, int64_t rows, int64_t cols, const uint8_t* mask, void* stream);

// calq's own device memory (every allocation of the CUDA backend is counted): the high-water mark
// and the current bytes, and the largest total − free of cudaMemGetInfo sampled at each
// allocation (the whole device: CUDA context, cuBLAS workspaces and other processes included).
// `used` is false when calq allocated nothing on the GPU (and always without CUDA).
struct GpuMemoryStats {
  bool used = false;
  std::string device;
  int64_t peak_bytes = 0, current_bytes = 0, total_bytes = 0, measured_peak_used_bytes = 0, allocations = 0;
};
GpuMemoryStats cuda_memory_stats();

}  // namespace calq::backend
