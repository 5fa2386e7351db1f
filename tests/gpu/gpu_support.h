// Shared by the GPU tests (ctest label gpu): skip, with the reason, when this build has no CUDA
// backend or no usable GPU is visible.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "calq/backend/device.h"
#include "calq/core/error.h"

namespace calq_test {

// Whether the CUDA backend can run here; *why says what is missing otherwise.
inline bool gpu_usable(std::string* why) {
  if (!calq::backend::cuda_built()) {
    *why = "built without CUDA";
    return false;
  }
  try {
    calq::backend::cuda_require();
  } catch (const calq::Error& e) {
    *why = e.what();
    return false;
  }
  return true;
}

}  // namespace calq_test

#define REQUIRE_GPU()                                       \
  do {                                                      \
    std::string why_;                                       \
    if (!calq_test::gpu_usable(&why_)) GTEST_SKIP() << why_; \
  } while (0)
