#include "calq/backend/device.h"

#include "calq/core/error.h"

namespace calq::backend {

Device parse_device(std::string_view name, std::string_view option) {
  if (name == "cpu") return Device::Cpu;
  if (name == "cuda") return Device::Cuda;
  fail("{} must be cpu or cuda, got '{}'", option, name);
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
#endif

}  // namespace calq::backend
