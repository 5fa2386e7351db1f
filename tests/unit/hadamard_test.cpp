// Hadamard rotations: every built-in order is orthogonal with ±1/√n entries, the fast transform
// equals the Sylvester matrix, rotations preserve linear outputs and GPTQ's Hessian error.
#include "calq/quant/hadamard.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "calq/core/error.h"

namespace {

using namespace calq::quant;

TEST(Hadamard, EveryOrderIsOrthogonal) {
  for (int64_t n : {1, 2, 4, 12, 16, 20, 24, 28, 40, 48, 56, 80, 96, 160, 320, 112, 256}) {
    SCOPED_TRACE(n);
    ASSERT_TRUE(hadamard_order_supported(n));
    auto h = hadamard_matrix(n);
    const double e = 1.0 / std::sqrt(static_cast<double>(n));
    for (auto v : h) ASSERT_NEAR(std::fabs(v), e, 1e-12);
    double worst = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t k = 0; k < n; ++k) s += h[i * n + k] * h[j * n + k];
        worst = std::max(worst, std::fabs(s - (i == j ? 1.0 : 0.0)));
      }
    EXPECT_LT(worst, 1e-9);
  }
  for (int64_t n : {3, 6, 36, 44, 100}) EXPECT_FALSE(hadamard_order_supported(n)) << n;
  EXPECT_THROW(hadamard_matrix(36), calq::Error);
}

TEST(Hadamard, FastTransformIsTheSylvesterMatrix) {
  std::mt19937 rng(1);
  std::normal_distribution<float> d;
  for (int64_t n : {16, 64, 256}) {
    auto h = hadamard_matrix(n);
    std::vector<float> x(n);
    for (auto& v : x) v = d(rng);
    std::vector<double> want(n, 0);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < n; ++k) want[j] += x[k] * h[k * n + j];
    fwht(x.data(), n);
    for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(x[j], want[j], 1e-5);
  }
  std::vector<float> y(12);
  EXPECT_THROW(fwht(y.data(), 12), calq::Error);
}

TEST(Rotation, PreservesLinearOutputsAndInverts) {
  std::mt19937 rng(2);
  std::normal_distribution<float> d;
  struct Case {
    int64_t dim, block;
  };
  for (Case c : {Case{256, 16}, Case{256, 128}, Case{128, 0}, Case{96, 0}, Case{80, 0}, Case{192, 64}}) {
    SCOPED_TRACE(c.dim * 1000 + c.block);
    auto r = Rotation::make(c.dim, c.block, 7);
    const int rows = 5, outs = 3;
    std::vector<float> x(rows * c.dim), w(outs * c.dim);
    for (auto& v : x) v = d(rng);
    for (auto& v : w) v = d(rng);
    auto xr = x, wr = w;
    r.apply_rows(xr.data(), rows);
    r.apply_rows(wr.data(), outs);
    for (int i = 0; i < rows; ++i)
      for (int o = 0; o < outs; ++o) {
        double a = 0, b = 0;
        for (int64_t k = 0; k < c.dim; ++k) {
          a += static_cast<double>(x[i * c.dim + k]) * w[o * c.dim + k];
          b += static_cast<double>(xr[i * c.dim + k]) * wr[o * c.dim + k];
        }
        EXPECT_NEAR(a, b, 1e-4 * (1 + std::fabs(a)));
      }
    r.apply_rows_inverse(xr.data(), rows);
    for (size_t k = 0; k < x.size(); ++k) EXPECT_NEAR(xr[k], x[k], 1e-5);
  }
  EXPECT_THROW(Rotation::make(96, 64, 1), calq::Error);  // block does not divide
  EXPECT_THROW(Rotation::make(100, 0, 1), calq::Error);  // no full-width matrix of order 100
}

TEST(Rotation, HessianTransformKeepsTheError) {
  // tr((W−Q) H (W−Q)ᵀ) = tr((W'−Q') H' (W'−Q')ᵀ) with W' = WR, Q' = QR, H' = RᵀHR.
  std::mt19937 rng(3);
  std::normal_distribution<float> d;
  for (int64_t block : {32, 0}) {
    const int64_t n = block ? 128 : 40, rows = 4;
    auto r = Rotation::make(n, block, 11);
    std::vector<float> X(300 * n);
    for (auto& v : X) v = d(rng);
    std::vector<double> H(n * n, 0);
    for (int t = 0; t < 300; ++t)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) H[i * n + j] += static_cast<double>(X[t * n + i]) * X[t * n + j] / 300;
    std::vector<float> D(rows * n);  // a weight difference W − Q
    for (auto& v : D) v = d(rng);
    auto err = [&](const std::vector<float>& dd, const std::vector<double>& hh) {
      double s = 0;
      for (int64_t o = 0; o < rows; ++o)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) s += dd[o * n + i] * hh[i * n + j] * dd[o * n + j];
      return s;
    };
    const double before = err(D, H);
    auto Dr = D;
    r.apply_rows(Dr.data(), rows);
    auto Hr = H;
    r.apply_hessian(Hr);
    EXPECT_NEAR(err(Dr, Hr), before, 1e-4 * before);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(Hr[i * n + j], Hr[j * n + i], 1e-9);
  }
}

TEST(Rotation, SignsAreSeededAndBalanced) {
  auto a = rotation_signs(4096, 1), b = rotation_signs(4096, 1), c = rotation_signs(4096, 2);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  int plus = 0;
  for (auto v : a) {
    ASSERT_TRUE(v == 1.f || v == -1.f);
    plus += v > 0;
  }
  EXPECT_NEAR(plus, 2048, 150);
}

}  // namespace
