// backend::GpuHessian (Hessians on the GPU from device inputs) against a slow fp64 reference and
// the CPU HessianAccumulator, on random and adversarial inputs, for the three input precisions;
// the GPU engine's device inputs for observers (Observer::device_input) end to end through GPTQ;
// cuda_power_sums against MomentAccumulator; the device-memory counters. Label "gpu"; every test
// skips without a usable GPU. Each accuracy test prints "[ hessian ]" lines with the measured
// errors (docs/cuda.md lists them).
//
// Errors of a Hessian H against the reference R (both Σ w²xxᵀ / Σ w²):
//   rel_fro = ‖H − R‖_F / ‖R‖_F;
//   rel_max = max_ij |H_ij − R_ij| / sqrt(R_ii R_jj) (each entry against the scale of its row and
//   column, so features of very different magnitudes are each measured on their own scale).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "calq/backend/device.h"
#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/pipeline/module_quant.h"
#include "calq/quant/gptq.h"
#include "calq/quant/hessian.h"
#include "gpu_support.h"
#include "support.h"

namespace {

using namespace calq;
using backend::GpuHessian;
using backend::HessianPrecision;

// The slow reference: Σ (w·x)(w·x)ᵀ over kept rows / Σ w², every product in fp64.
std::vector<double> reference(const std::vector<float>& x, int64_t rows, int64_t n, const std::vector<uint8_t>& mask,
                              const std::vector<float>& w) {
  std::vector<double> h(static_cast<size_t>(n * n), 0.0);
  double wsum = 0;
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    if (!mask.empty() && !mask[r]) continue;
    const double wr = w.empty() ? 1.0 : w[r];
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<double>(x[r * n + j]) * wr;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) h[i * n + j] += v[i] * v[j];
    wsum += wr * wr;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) h[j * n + i] = h[i * n + j] = wsum > 0 ? h[i * n + j] / wsum : 0.0;
  return h;
}

struct Err {
  double fro = 0, max = 0;
};
Err error_of(const std::vector<double>& h, const std::vector<double>& ref, int64_t n) {
  double num = 0, den = 0, mx = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double d = h[i * n + j] - ref[i * n + j];
      num += d * d;
      den += ref[i * n + j] * ref[i * n + j];
      const double s = std::sqrt(ref[i * n + i] * ref[j * n + j]);
      if (s > 0) mx = std::max(mx, std::fabs(d) / s);
      else EXPECT_EQ(h[i * n + j], 0.0) << i << "," << j;
    }
  return {den > 0 ? std::sqrt(num / den) : std::sqrt(num), mx};
}

// Device copy of host floats (synchronous).
struct DevFloats {
  float* p = nullptr;
  explicit DevFloats(const std::vector<float>& h) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(h.size(), 1) * sizeof(float)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DevFloats() { cudaFree(p); }
};

const char* name(HessianPrecision p) { return backend::hessian_precision_name(p); }

// Bounds on the errors per precision: fp32 is the CPU's arithmetic (fp32 products of ≤ 512 rows:
// the CPU accumulator itself is 3e-6 off the reference on the outlier + offset case), tf32 rounds
// inputs to 10 fraction bits, bf16 to 7 (largest measured on an H200: fp32 3.7e-6, tf32 5.2e-4,
// bf16 7.0e-3; docs/cuda.md).
double bound_max(HessianPrecision p) {
  return p == HessianPrecision::F32 ? 2e-5 : p == HessianPrecision::TF32 ? 4e-3 : 3e-2;
}
double bound_fro(HessianPrecision p) {
  return p == HessianPrecision::F32 ? 1e-5 : p == HessianPrecision::TF32 ? 1e-3 : 8e-3;
}

struct Input {
  std::string what;
  int64_t rows, n;
  std::vector<float> x;
  std::vector<uint8_t> mask;  // empty: every row
  std::vector<float> w;       // empty: unweighted
  std::vector<int64_t> splits;  // add() calls of these many rows (empty: one call)
};

std::vector<Input> cases() {
  std::vector<Input> v;
  std::mt19937 rng(12345);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto gauss = [&](int64_t rows, int64_t n) {
    std::vector<float> x(static_cast<size_t>(rows * n));
    for (auto& e : x) e = nd(rng);
    return x;
  };
  v.push_back({"random 1000x96 (rows not a multiple of the 512-row block)", 1000, 96,
               calq_test::correlated_inputs(1000, 96, 3, 0.2f, 11, 4.f), {}, {}, {}});
  {
    Input c{"padding mask (every 3rd row) + uneven add calls 37/600/1/362", 1000, 80, gauss(1000, 80), {}, {}, {37, 600, 1, 362}};
    c.mask.assign(1000, 1);
    for (int r = 0; r < 1000; r += 3) c.mask[r] = 0;
    for (int r = 0; r < 1000; ++r)
      if (!c.mask[r]) c.x[static_cast<size_t>(r) * 80] = 1e30f;  // padding rows hold garbage
    v.push_back(std::move(c));
  }
  {
    Input c{"routing weights in [0, 2] with zeros, masked", 700, 64, gauss(700, 64), {}, {}, {}};
    std::uniform_real_distribution<float> u(0.f, 2.f);
    c.w.resize(700);
    c.mask.assign(700, 1);
    for (int r = 0; r < 700; ++r) {
      c.w[r] = r % 10 == 0 ? 0.f : u(rng);
      c.mask[r] = r % 13 != 0;
    }
    v.push_back(std::move(c));
  }
  {
    // Columns of magnitudes 1e17 .. 1e-18 (x² from 1e34 down to 1e-36, all normal fp32).
    Input c{"huge and tiny magnitudes per column (1e17 .. 1e-18)", 600, 40, gauss(600, 40), {}, {}, {}};
    for (int r = 0; r < 600; ++r)
      for (int j = 0; j < 40; ++j) c.x[static_cast<size_t>(r) * 40 + j] *= std::pow(10.f, 17.f - 35.f * j / 39.f);
    v.push_back(std::move(c));
  }
  {
    // One outlier row 1e4 times the rest, and a constant large offset (ill-conditioned).
    Input c{"outlier row + large common offset", 1500, 128, gauss(1500, 128), {}, {}, {}};
    for (auto& e : c.x) e += 50.f;
    for (int j = 0; j < 128; ++j) c.x[700 * 128 + j] *= 1e4f;
    v.push_back(std::move(c));
  }
  v.push_back({"1 row", 1, 33, gauss(1, 33), {}, {}, {}});
  v.push_back({"1 feature", 513, 1, gauss(513, 1), {}, {}, {}});
  v.push_back({"exactly 2 blocks", 1024, 50, gauss(1024, 50), {}, {}, {}});
  return v;
}

TEST(GpuHessianAcc, MatchesFp64ReferenceAllPrecisions) {
  REQUIRE_GPU();
  for (const auto& c : cases()) {
    const auto ref = reference(c.x, c.rows, c.n, c.mask, c.w);
    int64_t kept = 0;
    for (int64_t r = 0; r < c.rows; ++r) kept += c.mask.empty() || c.mask[r];
    DevFloats dx(c.x);
    for (auto p : {HessianPrecision::F32, HessianPrecision::TF32, HessianPrecision::BF16}) {
      GpuHessian g(c.n, p);
      if (c.splits.empty()) {
        g.add(dx.p, c.rows, c.mask.empty() ? nullptr : c.mask.data(), c.w.empty() ? nullptr : c.w.data());
      } else {
        int64_t r0 = 0;
        for (int64_t k : c.splits) {
          g.add(dx.p + r0 * c.n, k, c.mask.empty() ? nullptr : c.mask.data() + r0,
                c.w.empty() ? nullptr : c.w.data() + r0);
          r0 += k;
        }
        ASSERT_EQ(r0, c.rows);
      }
      EXPECT_EQ(g.tokens(), kept) << c.what;
      const auto h = g.hessian();
      for (int64_t i = 0; i < c.n; ++i)
        for (int64_t j = 0; j < i; ++j) ASSERT_EQ(h[i * c.n + j], h[j * c.n + i]) << c.what << " not symmetric";
      const Err e = error_of(h, ref, c.n);
      std::printf("[ hessian ] %-62s %-4s rel_fro %.3g rel_max %.3g\n", c.what.c_str(), name(p), e.fro, e.max);
      EXPECT_LT(e.max, bound_max(p)) << c.what << " " << name(p);
      EXPECT_LT(e.fro, bound_fro(p)) << c.what << " " << name(p);
      if (p == HessianPrecision::F32) {
        // Against the CPU accumulator (the same blocks of rows, fp32 products into fp64).
        quant::HessianAccumulator cpu(c.n);
        if (c.w.empty()) cpu.add(c.x.data(), c.rows, c.mask.empty() ? nullptr : c.mask.data());
        else cpu.add_weighted(c.x.data(), c.rows, c.mask.empty() ? nullptr : c.mask.data(), c.w.data());
        EXPECT_EQ(g.weight(), cpu.weight()) << c.what;
        const Err ec = error_of(h, cpu.hessian(), c.n);
        std::printf("[ hessian ] %-62s fp32 vs CPU accumulator: rel_fro %.3g rel_max %.3g\n", c.what.c_str(), ec.fro,
                    ec.max);
        EXPECT_LT(ec.max, 2e-5) << c.what;
      }
    }
  }
}

TEST(GpuHessianAcc, BatchedTokensLikeCalibration) {
  // 8 chunks of 2048 tokens × 512 features (16384 rows, 32 blocks): the errors at a realistic size.
  REQUIRE_GPU();
  const int n = 512, chunk = 2048, chunks = 8;
  std::vector<float> all;
  for (int c = 0; c < chunks; ++c) {
    auto x = calq_test::correlated_inputs(chunk, n, 100 + c, 0.2f, 11, 4.f);
    all.insert(all.end(), x.begin(), x.end());
  }
  const auto ref = reference(all, int64_t{chunk} * chunks, n, {}, {});
  for (auto p : {HessianPrecision::F32, HessianPrecision::TF32, HessianPrecision::BF16}) {
    GpuHessian g(n, p);
    for (int c = 0; c < chunks; ++c)
      g.add_host(all.data() + static_cast<size_t>(c) * chunk * n, chunk);
    const Err e = error_of(g.hessian(), ref, n);
    std::printf("[ hessian ] %-62s %-4s rel_fro %.3g rel_max %.3g (GPU %.4f s)\n", "16384 correlated rows x 512",
                name(p), e.fro, e.max, g.gpu_seconds());
    EXPECT_LT(e.max, bound_max(p)) << name(p);
    EXPECT_LT(e.fro, bound_fro(p)) << name(p);
  }
}

TEST(GpuHessianAcc, PanelsAndLargeBlocksMatchFp64Reference) {
  // Widths from 1024 up take the lower triangle in column panels (an eighth of the width,
  // rounded up to 128 columns; here 1100 → 9 panels, the last one narrow); explicit blocks of
  // 1024 rows make 3 block products (the last partial), the default block one; split adds with
  // padding and routing weights cross the block edges.
  REQUIRE_GPU();
  const int64_t n = 1100, rows = 2600;
  const auto x = calq_test::correlated_inputs(rows, n, 77, 0.3f, 11, 4.f);
  std::vector<uint8_t> mask(rows, 1);
  std::vector<float> w(rows);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uw(0.f, 2.f);
  for (int64_t r = 0; r < rows; ++r) {
    w[r] = uw(rng);
    if (r % 7 == 3) mask[r] = 0;
  }
  const auto ref = reference(x, rows, n, mask, w);
  DevFloats dx(x);
  for (auto p : {HessianPrecision::TF32, HessianPrecision::BF16}) {
    for (int64_t block : {int64_t{1024}, int64_t{0}}) {
      GpuHessian g(n, p, block);
      for (int64_t r0 = 0; r0 < rows; r0 += 900) {
        const int64_t k = std::min<int64_t>(900, rows - r0);
        g.add(dx.p + r0 * n, k, mask.data() + r0, w.data() + r0);
      }
      const auto h = g.hessian();
      for (int64_t i = 0; i < n; i += 37)
        for (int64_t j = 0; j < i; ++j) ASSERT_EQ(h[i * n + j], h[j * n + i]) << "not symmetric";
      const Err e = error_of(h, ref, n);
      std::printf("[ hessian ] %-62s %-4s rel_fro %.3g rel_max %.3g\n",
                  block ? "1100 features, 2600 rows, blocks of 1024, panels" : "1100 features, 2600 rows, default block",
                  name(p), e.fro, e.max);
      EXPECT_LT(e.max, bound_max(p)) << name(p) << " block " << block;
      EXPECT_LT(e.fro, bound_fro(p)) << name(p) << " block " << block;
    }
  }
}

TEST(GpuHessianAcc, ZeroRowsAndAllPadding) {
  REQUIRE_GPU();
  GpuHessian g(17);
  EXPECT_EQ(g.tokens(), 0);
  for (double v : g.hessian()) EXPECT_EQ(v, 0.0);
  std::vector<float> x(5 * 17, 3.f);
  std::vector<uint8_t> none(5, 0);
  DevFloats dx(x);
  g.add(dx.p, 0, nullptr);
  g.add(dx.p, 5, none.data());
  EXPECT_EQ(g.tokens(), 0);
  for (double v : g.hessian()) EXPECT_EQ(v, 0.0);
  // Then real rows: H = 9 everywhere.
  g.add(dx.p, 5, nullptr);
  EXPECT_EQ(g.tokens(), 5);
  for (double v : g.hessian()) EXPECT_EQ(v, 9.0);
}

// HessianPrecision::Exact: every case above (blocks of 512 spanning uneven add calls, padding
// rows with garbage, routing weights with zeros, magnitudes from 1e17 to 1e-18, an outlier row
// over a large offset, one row, one feature, two full blocks) gives the CPU accumulator's matrix
// bit for bit, through hessian() and through finish_on_device(); plus 97..700 features (tiles of
// 64 that straddle the diagonal and the edge) on correlated inputs.
TEST(GpuHessianAcc, ExactIsTheCpuAccumulatorBitForBit) {
  REQUIRE_GPU();
  auto all = cases();
  for (int64_t n : {97, 200, 700}) {
    const int64_t rows = 1100;
    all.push_back({"correlated " + std::to_string(rows) + "x" + std::to_string(n), rows, n,
                   calq_test::correlated_inputs(static_cast<int>(rows), static_cast<int>(n), static_cast<unsigned>(n), 0.2f, 7, 3.f), {}, {}, {300, 800}});
  }
  for (const auto& c : all) {
    DevFloats dx(c.x);
    const uint8_t* mask = c.mask.empty() ? nullptr : c.mask.data();
    const float* w = c.w.empty() ? nullptr : c.w.data();
    GpuHessian g(c.n, HessianPrecision::Exact), g2(c.n, HessianPrecision::Exact);
    quant::HessianAccumulator cpu(c.n);
    const std::vector<int64_t> splits = c.splits.empty() ? std::vector<int64_t>{c.rows} : c.splits;
    int64_t r0 = 0;
    for (int64_t k : splits) {
      g.add(dx.p + r0 * c.n, k, mask ? mask + r0 : nullptr, w ? w + r0 : nullptr);
      g2.add(dx.p + r0 * c.n, k, mask ? mask + r0 : nullptr, w ? w + r0 : nullptr);
      if (w)
        cpu.add_weighted(c.x.data() + r0 * c.n, k, mask ? mask + r0 : nullptr, w + r0);
      else
        cpu.add(c.x.data() + r0 * c.n, k, mask ? mask + r0 : nullptr);
      r0 += k;
    }
    ASSERT_EQ(r0, c.rows) << c.what;
    EXPECT_EQ(g.weight(), cpu.weight()) << c.what;
    EXPECT_EQ(g.tokens(), cpu.tokens()) << c.what;
    const auto want = cpu.hessian();
    const auto got = g.hessian();
    int64_t bad = 0;
    for (size_t i = 0; i < want.size(); ++i) bad += std::memcmp(&want[i], &got[i], sizeof(double)) != 0;
    std::printf("[ hessian ] %-62s exact: %lld of %zu entries differ from the CPU accumulator\n", c.what.c_str(),
                static_cast<long long>(bad), want.size());
    EXPECT_EQ(bad, 0) << c.what;
    const auto od = g2.finish_on_device();
    if (od.data) {
      std::vector<double> on(want.size());
      ASSERT_EQ(cudaMemcpy(on.data(), od.data, on.size() * sizeof(double), cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(std::memcmp(on.data(), want.data(), on.size() * sizeof(double)), 0) << c.what << " (finish_on_device)";
    }
  }
}

TEST(GpuHessianAcc, HostAndDeviceInputsGiveTheSameBits) {
  REQUIRE_GPU();
  const int n = 200, rows = 1300;
  const auto x = calq_test::correlated_inputs(rows, n, 5, 0.2f, 11, 4.f);
  std::vector<uint8_t> mask(rows, 1);
  for (int64_t r = 0; r < rows; r += 5) mask[r] = 0;
  DevFloats dx(x);
  for (auto p : {HessianPrecision::F32, HessianPrecision::BF16}) {
    GpuHessian a(n, p), b(n, p);
    a.add(dx.p, rows, mask.data());
    b.add_host(x.data(), rows, mask.data());
    EXPECT_EQ(a.hessian(), b.hessian()) << name(p);
  }
}

// finish_on_device: the matrix left on the GPU is hessian()'s, bit for bit (all precisions,
// weighted rows), the diagonal that comes back is its diagonal, hessian() afterwards still gives
// the same bits, add() fails; an input with an infinity makes a non-finite Hessian, reported; an
// accumulator that saw nothing gives no data; GPTQ on the GPU from the device Hessian gives the
// codes of GPTQ on the GPU from the host copy.
TEST(GpuHessianAcc, FinishOnDeviceIsHessianInPlace) {
  REQUIRE_GPU();
  const int n = 192, rows = 1500;
  const auto x = calq_test::correlated_inputs(rows, n, 5, 0.2f, 12, 4.f);
  std::vector<float> w(rows);
  for (int r = 0; r < rows; ++r) w[r] = 0.25f + static_cast<float>(r % 7) / 3.f;
  DevFloats dx(x);
  for (auto p : {HessianPrecision::F32, HessianPrecision::TF32, HessianPrecision::BF16}) {
    GpuHessian a(n, p), b(n, p);
    a.add(dx.p, rows, nullptr, w.data());
    b.add(dx.p, rows, nullptr, w.data());
    const auto want = b.hessian();
    const auto od = a.finish_on_device();
    ASSERT_NE(od.data, nullptr);
    EXPECT_TRUE(od.finite);
    std::vector<double> got(want.size());
    ASSERT_EQ(cudaMemcpy(got.data(), od.data, got.size() * sizeof(double), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(got, want) << name(p);
    ASSERT_EQ(od.diag.size(), static_cast<size_t>(n));
    for (int j = 0; j < n; ++j) EXPECT_EQ(od.diag[j], want[j * n + j]) << j;
    EXPECT_EQ(a.hessian(), want) << name(p);
    EXPECT_THROW(a.add(dx.p, rows), Error);
    // GPTQ int4 g32 from the device copy (diagonal on the host) = from the host copy.
    std::vector<float> wt(static_cast<size_t>(64 * n));
    for (size_t i = 0; i < wt.size(); ++i) wt[i] = std::sin(0.37f * static_cast<float>(i)) * 0.05f;
    quant::GptqOptions o;
    o.cuda = true;
    const auto f = quant::Format::parse("int4", 32);
    const auto from_host = quant::gptq_quantize(wt.data(), 64, n, want, f, o, "host H");
    o.hessian_device = od.data;
    const auto from_dev = quant::gptq_quantize(wt.data(), 64, n, od.diag, f, o, "device H");
    EXPECT_EQ(from_dev.q.codes, from_host.q.codes) << name(p);
    EXPECT_EQ(from_dev.proxy_loss, from_host.proxy_loss) << name(p);
  }
  auto xi = x;
  xi[5 * n + 3] = INFINITY;
  DevFloats di(xi);
  GpuHessian inf(n);
  inf.add(di.p, rows);
  EXPECT_FALSE(inf.finish_on_device().finite);
  GpuHessian none(n);
  const auto nd = none.finish_on_device();
  EXPECT_EQ(nd.data, nullptr);
  EXPECT_TRUE(nd.diag.empty());
}

TEST(GpuHessianAcc, StreamOrderedInputMayBeOverwrittenAfterAdd) {
  // add() with the caller's stream: the copy of x is ordered after the upload on that stream, and
  // the memset that overwrites x right after add() waits for the gather.
  REQUIRE_GPU();
  const int n = 256, rows = 4000;
  const auto x = calq_test::correlated_inputs(rows, n, 8, 0.2f, 11, 4.f);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, x.size() * sizeof(float)), cudaSuccess);
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, x.size() * sizeof(float)), cudaSuccess);
  std::copy(x.begin(), x.end(), pinned);
  GpuHessian g(n), ref(n);
  for (int it = 0; it < 3; ++it) ref.add_host(x.data(), rows);  // the same blocks of the same rows
  for (int it = 0; it < 3; ++it) {
    ASSERT_EQ(cudaMemsetAsync(d, 0, x.size() * sizeof(float), s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(d, pinned, x.size() * sizeof(float), cudaMemcpyHostToDevice, s), cudaSuccess);
    g.add(d, rows, nullptr, nullptr, s);
    ASSERT_EQ(cudaMemsetAsync(d, 0xff, x.size() * sizeof(float), s), cudaSuccess);  // NaNs
  }
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  const auto h = g.hessian(), hr = ref.hessian();
  for (size_t i = 0; i < h.size(); ++i) ASSERT_TRUE(std::isfinite(h[i])) << i;
  EXPECT_EQ(h, hr);
  cudaFree(d);
  cudaFreeHost(pinned);
  cudaStreamDestroy(s);
}

TEST(GpuHessianAcc, Errors) {
  REQUIRE_GPU();
  std::vector<float> x(4 * 8, 1.f);
  std::vector<float> w = {1.f, -1.f, 1.f, 1.f};
  DevFloats dx(x);
  GpuHessian g(8);
  try {
    g.add(dx.p, 4, nullptr, w.data());
    FAIL() << "expected an error for a negative token weight";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token weight -1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(GpuHessian(0), Error);
  EXPECT_THROW(backend::parse_hessian_precision("fp16"), Error);
  try {
    GpuHessian huge(400000);  // 1.28 TB of fp64 sums
    FAIL() << "expected an out-of-memory error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out of GPU memory"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("1280000000000"), std::string::npos) << e.what();
  }
}

TEST(GpuHessianAcc, PowerSumsMatchMomentAccumulator) {
  REQUIRE_GPU();
  const int rows = 3000, cols = 96;
  auto x = calq_test::correlated_inputs(rows, cols, 21, 0.2f, 11, 4.f);
  std::vector<uint8_t> mask(rows, 1);
  for (int64_t r = 0; r < rows; r += 4) mask[r] = 0;
  DevFloats dx(x);
  pipeline::MomentAccumulator cpu, gpu;
  cpu.add(x.data(), rows, cols, mask.data());
  const auto p = backend::cuda_power_sums(dx.p, rows, cols, mask.data(), nullptr);
  gpu.add_sums(p.s1, p.s2, p.s3, p.s4, p.n);
  EXPECT_EQ(gpu.count(), cpu.count());
  std::printf("[ hessian ] kurtosis CPU %.12g GPU %.12g\n", cpu.kurtosis(), gpu.kurtosis());
  EXPECT_NEAR(gpu.kurtosis(), cpu.kurtosis(), 1e-9 * cpu.kurtosis());
}

TEST(GpuHessianAcc, MemoryCountersSeeTheAccumulator) {
  REQUIRE_GPU();
  const int64_t n = 3000;
  const auto before = backend::cuda_memory_stats();
  {
    GpuHessian g(n);
    const auto during = backend::cuda_memory_stats();
    EXPECT_TRUE(during.used);
    EXPECT_GE(during.current_bytes - before.current_bytes, n * n * 8 + 512 * n * 4);
    EXPECT_GE(during.peak_bytes, during.current_bytes);
    EXPECT_GT(during.measured_peak_used_bytes, n * n * 8);
    EXPECT_GT(during.total_bytes, during.measured_peak_used_bytes);
    EXPECT_FALSE(during.device.empty());
  }
  const auto after = backend::cuda_memory_stats();
  EXPECT_EQ(after.current_bytes, before.current_bytes);  // freed
  EXPECT_GE(after.peak_bytes, n * n * 8);
}

// The GPU engine's observer inputs: device inputs (no host copy) accumulated on the GPU vs host
// copies accumulated by the CPU HessianAccumulator, then GPTQ (CPU, int4 g128; g16 on the tiny
// fixtures) with each, from the same activations: the codes agree (≥ 99.9 %) over the linear
// modules of the model.
class DeviceInputs : public ::testing::TestWithParam<std::string> {};

bool is_moe_fixture(const std::string& p) { return p == "qwen3_moe_sparse" || p == "mixtral"; }
// int4 groups: 128 on bench-qwen3-28m, per channel on the MoE fixtures (expert intermediate 24
// fits no group size), else 16.
int64_t group_for(const std::string& p) { return p == "bench-qwen3-28m" ? 128 : is_moe_fixture(p) ? -1 : 16; }

struct Collect : engine::Observer {
  bool device = false;
  std::map<std::string, quant::HessianAccumulator> host;
  std::map<std::string, GpuHessian> gpu;
  std::map<std::string, std::vector<std::string>> modules;  // key (first module) -> modules of the input
  int64_t device_inputs = 0, host_inputs = 0, expert_inputs = 0;
  bool device_input() const override { return device; }
  void on_linear_input(const engine::LinearInput& in) override {
    const std::string& k = in.modules.front();
    modules[k] = in.modules;
    // An MoE expert's routed rows count with their routing weight (the pipeline's default,
    // --moe-token-weight routing); its GpuHessian takes the pipeline's 512-row blocks.
    const float* w = in.expert >= 0 && in.routed ? in.routing_weight : nullptr;
    if (in.expert >= 0) ++expert_inputs;
    if (in.x_device) {
      ++device_inputs;
      EXPECT_EQ(in.x, nullptr);
      EXPECT_NE(in.stream, nullptr);
      gpu.try_emplace(k, in.cols, backend::HessianPrecision::F32, in.expert >= 0 ? 512 : 0)
          .first->second.add(in.x_device, in.rows, in.real, w, in.stream);
    } else {
      ++host_inputs;
      auto& h = host.try_emplace(k, in.cols).first->second;
      if (w) h.add_weighted(in.x, in.rows, in.real, w);
      else h.add(in.x, in.rows, in.real);
    }
  }
};

TEST_P(DeviceInputs, SameGptqCodesAsHostHessians) {
  REQUIRE_GPU();
  const calq_test::fs::path dir = GetParam() == "bench-qwen3-28m"
                                      ? calq_test::fs::path(CALQ_SHARED_DIR) / "data/models/bench-qwen3-28m"
                                      : calq_test::source_dir() / "tests/data/engine" / GetParam();
  if (!calq_test::fs::exists(dir / "config.json")) GTEST_SKIP() << dir << " is not here";
  engine::Options o;
  o.device = backend::Device::Cuda;
  o.allow_long_context = true;
  auto m = engine::Model::load(dir, o);
  const int64_t B = 4, T = GetParam() == "bench-qwen3-28m" ? 256 : 48;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(m.config().vocab_size - 1));
  engine::Batch b;
  b.batch = B;
  b.seq = T;
  for (int64_t i = 0; i < B * T; ++i) b.tokens.push_back(tok(rng));
  b.lengths = {T, T - 5, T / 2, T};
  Collect host, dev;
  dev.device = true;
  for (Collect* c : {&host, &dev}) {
    engine::Activations h = m.embed(b);
    for (int64_t l = 0; l < m.num_layers(); ++l) m.run_layer(l, h, c);
    m.head(h, c);
  }
  EXPECT_EQ(dev.host_inputs, 0);
  EXPECT_GT(dev.device_inputs, 0);
  EXPECT_EQ(dev.device_inputs, host.host_inputs);
  ASSERT_EQ(dev.gpu.size(), host.host.size());
  int64_t same = 0, total = 0;
  double worst = 0;
  if (is_moe_fixture(GetParam())) {
    EXPECT_GT(dev.expert_inputs, 0);
    EXPECT_EQ(dev.expert_inputs, host.expert_inputs);
  }
  const auto f = quant::Format::parse("int4", group_for(GetParam()));
  quant::GptqOptions go;
  for (auto& [k, acc] : host.host) {
    ASSERT_TRUE(dev.gpu.count(k)) << k;
    EXPECT_EQ(dev.gpu.at(k).tokens(), acc.tokens()) << k;
    const auto Hh = acc.hessian(), Hd = dev.gpu.at(k).hessian();
    const int64_t n = acc.features();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double s = std::sqrt(Hh[i * n + i] * Hh[j * n + j]);
        if (s > 0) worst = std::max(worst, std::fabs(Hh[i * n + j] - Hd[i * n + j]) / s);
      }
    // The modules sharing this input: each weight quantized with either Hessian.
    for (const auto& mod : host.modules.at(k)) {
      if (mod == "lm_head") continue;
      const auto w = m.weight(mod);
      const int64_t rows = m.out_features(mod);
      const auto a = quant::gptq_quantize(w.data(), rows, n, Hh, f, go, mod);
      const auto c = quant::gptq_quantize(w.data(), rows, n, Hd, f, go, mod);
      for (size_t i = 0; i < a.q.codes.size(); ++i) same += a.q.codes[i] == c.q.codes[i];
      total += static_cast<int64_t>(a.q.codes.size());
    }
  }
  ASSERT_GT(total, 0);
  const double agree = static_cast<double>(same) / static_cast<double>(total);
  std::printf("[ hessian ] %s: %zu inputs, device vs host Hessians rel_max %.3g, GPTQ int4 codes identical %.4f %% "
              "(%lld of %lld)\n",
              GetParam().c_str(), host.host.size(), worst, 100 * agree, static_cast<long long>(same),
              static_cast<long long>(total));
  EXPECT_LT(worst, 2e-6);
  EXPECT_GE(agree, 0.999);
}

// The yardstick for the agreement above, on the CPU alone (runs without a GPU): the same inputs
// and the CPU accumulator with 512-row blocks vs 384-row blocks — a change of the fp32 summation
// order only, like the GPU's — and GPTQ with each Hessian.
TEST_P(DeviceInputs, CpuSummationOrderBaseline) {
  const calq_test::fs::path dir = GetParam() == "bench-qwen3-28m"
                                      ? calq_test::fs::path(CALQ_SHARED_DIR) / "data/models/bench-qwen3-28m"
                                      : calq_test::source_dir() / "tests/data/engine" / GetParam();
  if (!calq_test::fs::exists(dir / "config.json")) GTEST_SKIP() << dir << " is not here";
  auto m = engine::Model::load(dir);
  const int64_t B = 4, T = GetParam() == "bench-qwen3-28m" ? 256 : 48;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(m.config().vocab_size - 1));
  engine::Batch b;
  b.batch = B;
  b.seq = T;
  for (int64_t i = 0; i < B * T; ++i) b.tokens.push_back(tok(rng));
  b.lengths = {T, T - 5, T / 2, T};
  struct Two : engine::Observer {
    std::map<std::string, quant::HessianAccumulator> a, c;
    std::map<std::string, std::vector<std::string>> modules;
    void on_linear_input(const engine::LinearInput& in) override {
      const std::string& k = in.modules.front();
      modules[k] = in.modules;
      a.try_emplace(k, in.cols, 512).first->second.add(in.x, in.rows, in.real);
      c.try_emplace(k, in.cols, 384).first->second.add(in.x, in.rows, in.real);
    }
  } two;
  engine::Activations h = m.embed(b);
  for (int64_t l = 0; l < m.num_layers(); ++l) m.run_layer(l, h, &two);
  const auto f = quant::Format::parse("int4", group_for(GetParam()));
  quant::GptqOptions go;
  int64_t same = 0, total = 0;
  double worst = 0;
  for (auto& [k, acc] : two.a) {
    const auto Ha = acc.hessian(), Hc = two.c.at(k).hessian();
    const int64_t n = acc.features();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double sc = std::sqrt(Ha[i * n + i] * Ha[j * n + j]);
        if (sc > 0) worst = std::max(worst, std::fabs(Ha[i * n + j] - Hc[i * n + j]) / sc);
      }
    for (const auto& mod : two.modules.at(k)) {
      const auto w = m.weight(mod);
      const auto qa = quant::gptq_quantize(w.data(), m.out_features(mod), n, Ha, f, go, mod);
      const auto qc = quant::gptq_quantize(w.data(), m.out_features(mod), n, Hc, f, go, mod);
      for (size_t i = 0; i < qa.q.codes.size(); ++i) same += qa.q.codes[i] == qc.q.codes[i];
      total += static_cast<int64_t>(qa.q.codes.size());
    }
  }
  ASSERT_GT(total, 0);
  std::printf("[ hessian ] %s: CPU blocks 512 vs 384: rel_max %.3g, GPTQ int4 codes identical %.4f %%\n",
              GetParam().c_str(), worst, 100.0 * static_cast<double>(same) / static_cast<double>(total));
  EXPECT_LT(worst, 2e-5);
}

INSTANTIATE_TEST_SUITE_P(Models, DeviceInputs,
                         ::testing::Values("llama_gqa", "qwen3_qknorm", "gpt2", "qwen3_moe_sparse", "mixtral",
                                           "bench-qwen3-28m"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& ch : s)
                             if (ch == '-') ch = '_';
                           return s;
                         });

}  // namespace

namespace {

// GPTQ on the GPU reading the weights from device memory (quant::GptqOptions::weight_device, the
// GPU engine's copy): fp32 or bf16 bits, against the same values given on the host — identical
// codes, group parameters and loss; Ŵ left on the GPU (w_hat_on_device) is q.dequantize() bit
// for bit, also with static groups and per-channel; and a non-finite device weight names itself
// as on the host.
TEST(GptqDeviceWeights, SameCodesAsHostWeights) {
  REQUIRE_GPU();
  const int64_t rows = 96, cols = 256;
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0.f, 0.05f);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (auto& v : w) v = nd(rng);
  for (int64_t r = 0; r < rows; ++r) w[static_cast<size_t>(r * cols + 7)] *= 40.f;  // an outlier column
  const auto x = calq_test::correlated_inputs(2000, cols, 31, 0.3f, 11, 4.f);
  quant::HessianAccumulator acc(cols);
  acc.add(x.data(), 2000, nullptr);
  const auto H = acc.hessian();
  struct Fmt {
    const char* spec;
    int group;
    std::optional<float> global;
  };
  for (const Fmt& fm : {Fmt{"int4", 32, {}}, Fmt{"int4", 128, {}}, Fmt{"mxfp4", 32, {}}, Fmt{"nvfp4", 16, 0.002f}}) {
    const auto f = quant::Format::parse(fm.spec, fm.group);
    for (bool bf16 : {false, true}) {
      std::vector<float> host = w;
      std::vector<uint16_t> bits(w.size());
      for (size_t i = 0; i < w.size(); ++i) {
        bits[i] = f32_to_bf16(w[i]);
        if (bf16) host[i] = bf16_to_f32(bits[i]);
      }
      void* d = nullptr;
      const size_t bytes = w.size() * (bf16 ? 2 : 4);
      ASSERT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d, bf16 ? static_cast<const void*>(bits.data()) : static_cast<const void*>(host.data()),
                           bytes, cudaMemcpyHostToDevice),
                cudaSuccess);
      for (bool act_order : {false, true}) {
        quant::GptqOptions o;
        o.cuda = true;
        o.act_order = act_order;
        o.static_groups = false;  // static groups read the host weights
        o.global_scale = fm.global;
        const auto want = quant::gptq_quantize(host.data(), rows, cols, H, f, o, "host W");
        o.weight_device = d;
        o.weight_device_bf16 = bf16;
        o.w_hat_on_device = true;
        const auto got = quant::gptq_quantize(nullptr, rows, cols, H, f, o, "device W");
        const std::string what = std::string(fm.spec) + (bf16 ? " bf16" : " fp32") + (act_order ? " act-order" : "");
        EXPECT_EQ(got.q.codes, want.q.codes) << what;
        ASSERT_EQ(got.q.params.size(), want.q.params.size()) << what;
        for (size_t i = 0; i < want.q.params.size(); ++i) {
          ASSERT_EQ(got.q.params[i].scale, want.q.params[i].scale) << what << " group " << i;
          ASSERT_EQ(got.q.params[i].zero, want.q.params[i].zero) << what << " group " << i;
        }
        EXPECT_EQ(got.q.g_idx, want.q.g_idx) << what;
        EXPECT_EQ(got.proxy_loss, want.proxy_loss) << what;
        ASSERT_TRUE(got.w_hat_device) << what;
        EXPECT_EQ(got.w_hat_device_ordinal, 0);
        std::vector<float> w_hat(w.size());
        ASSERT_EQ(cudaMemcpy(w_hat.data(), got.w_hat_device.get(), w_hat.size() * 4, cudaMemcpyDeviceToHost),
                  cudaSuccess);
        const auto ref = got.q.dequantize();
        for (size_t i = 0; i < ref.size(); ++i)
          ASSERT_EQ(quant::elem::f32_bits(w_hat[i]), quant::elem::f32_bits(ref[i])) << what << " element " << i;
      }
      // Static parameters (act-order with static groups; per-channel) read host weights; Ŵ on
      // the GPU follows their original-order groups.
      for (const auto& [fs, act] : {std::pair{f, true}, std::pair{quant::Format::parse("int4", -1), false}}) {
        quant::GptqOptions o;
        o.cuda = true;
        o.act_order = act;
        o.static_groups = true;
        o.global_scale = fm.global;
        o.w_hat_on_device = true;
        const auto got = quant::gptq_quantize(host.data(), rows, cols, H, fs, o, "static");
        ASSERT_TRUE(got.w_hat_device);
        std::vector<float> w_hat(w.size());
        ASSERT_EQ(cudaMemcpy(w_hat.data(), got.w_hat_device.get(), w_hat.size() * 4, cudaMemcpyDeviceToHost),
                  cudaSuccess);
        const auto ref = got.q.dequantize();
        for (size_t i = 0; i < ref.size(); ++i)
          ASSERT_EQ(quant::elem::f32_bits(w_hat[i]), quant::elem::f32_bits(ref[i])) << fm.spec << " static, element " << i;
      }
      cudaFree(d);
    }
  }
  // A NaN at row 3, column 5 (bf16 bits 0x7FC0): the host path's message.
  std::vector<uint16_t> bits(w.size());
  for (size_t i = 0; i < w.size(); ++i) bits[i] = f32_to_bf16(w[i]);
  bits[static_cast<size_t>(3 * cols + 5)] = 0x7FC0;
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, bits.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  quant::GptqOptions o;
  o.cuda = true;
  o.weight_device = d;
  o.weight_device_bf16 = true;
  try {
    quant::gptq_quantize(nullptr, rows, cols, H, quant::Format::parse("int4", 32), o, "m.nan");
    ADD_FAILURE() << "a NaN weight was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("m.nan: weight nan at row 3, column 5 is not finite"), std::string::npos)
        << e.what();
  }
  cudaFree(d);
}

}  // namespace
