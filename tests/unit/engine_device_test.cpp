// engine::Options::device on a machine where the GPU forward pass cannot run (CI: no CUDA build,
// or a CUDA build without a GPU): Model::load fails with the clear error of backend::cuda_require,
// never a crash or a silent CPU engine. parse_precision's values. (tests/gpu/engine_cuda_test.cpp
// covers machines with a GPU.)
#include <gtest/gtest.h>

#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "support.h"

using namespace calq;

namespace {

TEST(EngineDevice, ParsePrecision) {
  EXPECT_EQ(engine::parse_precision("fp32"), engine::Precision::F32);
  EXPECT_EQ(engine::parse_precision("bf16"), engine::Precision::BF16);
  EXPECT_EQ(engine::parse_precision("bf16-fast"), engine::Precision::BF16_FAST);
  EXPECT_EQ(engine::parse_precision("exact"), engine::Precision::Exact);
  for (auto p : {engine::Precision::F32, engine::Precision::BF16, engine::Precision::BF16_FAST, engine::Precision::Exact})
    EXPECT_EQ(engine::parse_precision(engine::precision_name(p)), p);
  try {
    engine::parse_precision("fp16");
    ADD_FAILURE() << "fp16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--gpu-precision must be fp32, bf16, bf16-fast or exact, got 'fp16'"), std::string::npos)
        << e.what();
  }
}

TEST(EngineDevice, CudaWithoutGpuIsAClearError) {
  std::string why;
  try {
    backend::cuda_require();
  } catch (const Error& e) {
    why = e.what();
  }
  if (why.empty()) GTEST_SKIP() << "a usable GPU is visible (tests/gpu/engine_cuda_test.cpp)";
  engine::Options o;
  o.device = backend::Device::Cuda;
  for (const char* fx : {"llama_gqa", "gpt2", "qwen3_moe_norm", "mixtral"}) {
    try {
      engine::Model::load(calq_test::source_dir() / "tests/data/engine" / fx, o);
      ADD_FAILURE() << fx << " loaded with device cuda";
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(backend::cuda_built() ? "--device cuda: no CUDA GPU is visible"
                                             : "--device cuda: this calq was built without CUDA"),
                std::string::npos)
          << m;
      EXPECT_NE(m.find("--device cpu"), std::string::npos) << m;
    }
  }
  // The default is the CPU engine.
  EXPECT_NO_THROW(engine::Model::load(calq_test::source_dir() / "tests/data/engine/llama_gqa"));
}

// Exact GPU precision is refused for GPT-2 (its GELU takes tanh from the math library) before any
// GPU is needed, naming the model type and the way out; llama-family models, MoE included, pass
// that check (and then need a GPU like any other).
TEST(EngineDevice, ExactPrecisionIsForLlamaFamilyModels) {
  engine::Options o;
  o.device = backend::Device::Cuda;
  o.gpu_precision = engine::Precision::Exact;
  try {
    engine::Model::load(calq_test::source_dir() / "tests/data/engine/gpt2", o);
    ADD_FAILURE() << "gpt2 loaded in exact mode";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--forward-precision exact supports the llama-family models"), std::string::npos) << m;
    EXPECT_NE(m.find("not gpt2"), std::string::npos) << m;
    EXPECT_NE(m.find("use fp32"), std::string::npos) << m;
  }
  std::string why;
  try {
    backend::cuda_require();
  } catch (const Error& e) {
    why = e.what();
  }
  if (why.empty()) return;  // a GPU: tests/gpu/engine_cuda_test.cpp runs the exact mode
  for (const char* fx : {"qwen3_qknorm", "qwen3_moe_norm", "mixtral"}) {
    try {
      engine::Model::load(calq_test::source_dir() / "tests/data/engine" / fx, o);
      ADD_FAILURE() << fx << " loaded with device cuda and no GPU";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).find("exact supports"), std::string::npos) << fx << ": " << e.what();
    }
  }
}

}  // namespace
