// --device parsing, and on a build without CUDA the clear error of every CUDA entry point.
#include "calq/backend/device.h"

#include <gtest/gtest.h>

#include <string>

#include "calq/core/error.h"
#include "calq/quant/gptq.h"

namespace {

using namespace calq;

TEST(Device, Parses) {
  EXPECT_EQ(backend::parse_device("cpu"), backend::Device::Cpu);
  EXPECT_EQ(backend::parse_device("cuda"), backend::Device::Cuda);
  try {
    backend::parse_device("gpu");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--device must be cpu or cuda, got 'gpu'"), std::string::npos) << e.what();
  }
}

TEST(Device, ParsesHessianPrecision) {
  EXPECT_EQ(backend::parse_hessian_precision("fp32"), backend::HessianPrecision::F32);
  EXPECT_EQ(backend::parse_hessian_precision("tf32"), backend::HessianPrecision::TF32);
  EXPECT_EQ(backend::parse_hessian_precision("bf16"), backend::HessianPrecision::BF16);
  EXPECT_EQ(backend::parse_hessian_precision("exact"), backend::HessianPrecision::Exact);
  for (auto p : {backend::HessianPrecision::F32, backend::HessianPrecision::TF32, backend::HessianPrecision::BF16,
                 backend::HessianPrecision::Exact})
    EXPECT_EQ(backend::parse_hessian_precision(backend::hessian_precision_name(p)), p);
  try {
    backend::parse_hessian_precision("fp16");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--hessian-precision must be fp32, tf32, bf16 or exact, got 'fp16'"),
              std::string::npos)
        << e.what();
  }
  // The default block of a GPU Hessian is plain arithmetic, the same with or without CUDA: the
  // CPU's 512 rows in fp32; for TF32 / BF16 the multiple of 512 whose rows fit 256 MiB, in [512, 8192].
  using backend::GpuHessian;
  using backend::HessianPrecision;
  EXPECT_EQ(GpuHessian::default_block(12288, HessianPrecision::F32), 512);
  EXPECT_EQ(GpuHessian::default_block(4096, HessianPrecision::Exact), 512);  // the CPU's blocks, always
  EXPECT_EQ(GpuHessian::default_block(4096, HessianPrecision::TF32), 8192);    // 16384 rows fit
  EXPECT_EQ(GpuHessian::default_block(12288, HessianPrecision::TF32), 5120);   // 5461 rows fit
  EXPECT_EQ(GpuHessian::default_block(12288, HessianPrecision::BF16), 8192);   // 10922 rows fit
  EXPECT_EQ(GpuHessian::default_block(25600, HessianPrecision::BF16), 5120);   // 5242 rows fit
  EXPECT_EQ(GpuHessian::default_block(1 << 20, HessianPrecision::TF32), 512);  // 64 rows fit: at least 512
}

TEST(Device, CudaWithoutCudaBuildIsAClearError) {
  if (backend::cuda_built()) GTEST_SKIP() << "built with CUDA (tests/gpu covers the CUDA build)";
  std::vector<float> W(8 * 32, 0.1f);
  std::vector<double> H(32 * 32, 0.0);
  for (int i = 0; i < 32; ++i) H[i * 32 + i] = 1;
  quant::GptqOptions o;
  o.cuda = true;
  try {
    quant::gptq_quantize(W.data(), 8, 32, H, quant::Format::parse("int4", 32), o, "m");
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--device cuda: this calq was built without CUDA"), std::string::npos) << m;
    EXPECT_NE(m.find("--device cpu"), std::string::npos) << m;
  }
  EXPECT_THROW(backend::cuda_require(), Error);
  EXPECT_THROW(backend::cuda_hessian_sum(nullptr, 0, 4, nullptr, 512, nullptr), Error);
  EXPECT_THROW(backend::cuda_hadamard_rows(quant::Rotation::make(32, 16, 1), W.data(), 1, false), Error);
  std::vector<double> h(32 * 32, 0.0);
  EXPECT_THROW(backend::cuda_hadamard_rows(quant::Rotation::make(32, 16, 1), h.data(), 1, false), Error);
  EXPECT_THROW(backend::cuda_rotate_hessian(quant::Rotation::make(32, 16, 1), h), Error);
  try {
    backend::GpuHessian h(32);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--device cuda: this calq was built without CUDA"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(backend::cuda_power_sums(nullptr, 0, 4, nullptr, nullptr), Error);
  EXPECT_FALSE(backend::cuda_memory_stats().used);
}

}  // namespace
