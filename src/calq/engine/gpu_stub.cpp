// engine::gpu::create without the CUDA backend: the error every CUDA entry point gives in such a
// build (backend::cuda_require). With CALQ_HAVE_CUDA it is defined in
// src/calq/backend/cuda/engine_cuda.cpp instead.
#include "calq/engine/gpu.h"

#ifndef CALQ_HAVE_CUDA
#include "calq/backend/device.h"

namespace calq::engine::gpu {

std::unique_ptr<Forward> create(const io::ModelConfig&, Precision, const Source&, const std::vector<uint8_t>&, bool,
                                int64_t, bool) {
  backend::cuda_require("--device cuda");  // throws: built without CUDA
  return nullptr;
}

}  // namespace calq::engine::gpu
#endif
