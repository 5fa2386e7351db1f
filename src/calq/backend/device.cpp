#include "calq/backend/device.h"

#include <algorithm>

#include "calq/core/error.h"

namespace calq::backend {

Device parse_device(std::string_view name, std::string_view option) {
  if (name == "cpu") return Device::Cpu;
  if (name == "cuda") return Device::Cuda;
  fail("{} must be cpu or cuda, got '{}'", option, name);
}

HessianPrecision parse_hessian_precision(std::string_view name, std::string_view option) {
  if (name == "fp32") return HessianPrecision::F32;
  if (name == "tf32") return HessianPrecision::TF32;
  if (name == "bf16") return HessianPrecision::BF16;
  if (name == "exact") return HessianPrecision::Exact;
  fail("{} must be fp32, tf32, bf16 or exact, got '{}'", option, name);
}

const char* hessian_precision_name(HessianPrecision p) {
  switch (p) {
    case HessianPrecision::F32: return "fp32";
    case HessianPrecision::TF32: return "tf32";
    case HessianPrecision::BF16: return "bf16";
    case HessianPrecision::Exact: return "exact";
  }
  return "?";
}

int64_t GpuHessian::default_block(int64_t features, HessianPrecision precision) {
  if (precision == HessianPrecision::F32 || precision == HessianPrecision::Exact || features <= 0) return 512;
  const int64_t elem = precision == HessianPrecision::BF16 ? 2 : 4;
  const int64_t fit = (int64_t{256} << 20) / (features * elem) / 512 * 512;
  return std::clamp<int64_t>(fit, 512, 8192);
}

#ifndef CALQ_HAVE_CUDA
// This build has no CUDA backend (CMake found no CUDA compiler, or CALQ_CUDA=OFF).

namespace {
[[noreturn]] void no_cuda(std::string_view option) {
  fail("{}: this calq was built without CUDA (CMake found no CUDA compiler, or -DCALQ_CUDA=OFF); rebuild on a "
       "machine with the CUDA toolkit (nvcc) using -DCALQ_CUDA=ON, or use --device cpu",
       option);
}
}  // namespace

bool cuda_built() { return false; }

std::string cuda_require(std::string_view option) { no_cuda(option); }

std::vector<double> cuda_hessian_sum(const float*, int64_t, int64_t, const uint8_t*, int64_t, int64_t*) {
  no_cuda("--device cuda");
}

quant::GptqResult cuda_gptq_quantize(const float*, int64_t, int64_t, const std::vector<double>&, const quant::Format&,
                                     const quant::GptqOptions&, const std::string&) {
  no_cuda("--device cuda");
}

std::vector<int> cuda_parse_devices(std::string_view, std::string_view option) { no_cuda(option); }
uint64_t cuda_free_bytes() { return 0; }
CudaDeviceScope::CudaDeviceScope(int) {}
CudaDeviceScope::~CudaDeviceScope() = default;

void cuda_hadamard_rows(const quant::Rotation&, float*, int64_t, bool) { no_cuda("--device cuda"); }
void cuda_hadamard_rows(const quant::Rotation&, double*, int64_t, bool) { no_cuda("--device cuda"); }
void cuda_rotate_hessian(const quant::Rotation&, std::vector<double>&) { no_cuda("--device cuda"); }
bool cuda_hadamard_supported(const quant::Rotation&) { return false; }

struct GpuHessian::Impl {};
GpuHessian::GpuHessian(int64_t, HessianPrecision, int64_t) { no_cuda("--device cuda"); }
GpuHessian::GpuHessian(GpuHessian&&) noexcept = default;
GpuHessian& GpuHessian::operator=(GpuHessian&&) noexcept = default;
GpuHessian::~GpuHessian() = default;
// An object cannot exist without CUDA (the constructor throws); these only satisfy the linker.
void GpuHessian::add(const float*, int64_t, const uint8_t*, const float*, void*) { no_cuda("--device cuda"); }
void GpuHessian::add_host(const float*, int64_t, const uint8_t*, const float*) { no_cuda("--device cuda"); }
int64_t GpuHessian::features() const { no_cuda("--device cuda"); }
int64_t GpuHessian::tokens() const { no_cuda("--device cuda"); }
double GpuHessian::weight() const { no_cuda("--device cuda"); }
HessianPrecision GpuHessian::precision() const { no_cuda("--device cuda"); }
std::vector<double> GpuHessian::hessian() const { no_cuda("--device cuda"); }
double GpuHessian::gpu_seconds() const { no_cuda("--device cuda"); }
GpuHessian::OnDevice GpuHessian::finish_on_device() { no_cuda("--device cuda"); }

PowerSums cuda_power_sums(const float*, int64_t, int64_t, const uint8_t*, void*) { no_cuda("--device cuda"); }

GpuMemoryStats cuda_memory_stats() { return {}; }
#endif

}  // namespace calq::backend
