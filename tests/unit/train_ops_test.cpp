// Gradient checks of the training ops against central finite differences (fp32 ops, the loss
// L = sum(y * r) accumulated in double with a fixed random r), on random and adversarial inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "calq/engine/engine.h"
#include "calq/train/ops.h"

using namespace calq::train;

namespace {

std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = offset + scale * d(g);
  return v;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Compares an analytic gradient with central differences of f over `x` (modified in place and
// restored): relative L2 error and the worst element against the gradient's scale.
void check_grad(const char* what, std::vector<float>& x, const std::vector<float>& analytic,
                const std::function<double()>& f, float h, double tol = 2e-3) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  double num = 0, den = 0, worst = 0, gmax = 0;
  for (float g : analytic) gmax = std::max(gmax, static_cast<double>(std::fabs(g)));
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    x[i] = x0 + h;
    const double fp = f();
    x[i] = x0 - h;
    const double fm = f();
    x[i] = x0;
    const double fd = (fp - fm) / (static_cast<double>(x0 + h) - static_cast<double>(x0 - h));
    const double e = fd - analytic[i];
    num += e * e;
    den += fd * fd;
    worst = std::max(worst, std::fabs(e));
  }
  ASSERT_GT(gmax, 0.0) << what << ": the gradient is identically zero (the check would prove nothing)";
  EXPECT_LT(std::sqrt(num / den), tol) << what;
  EXPECT_LT(worst, 10 * tol * gmax + 1e-6) << what;
}

}  // namespace

TEST(TrainOps, LinearLoraGradients) {
  const int64_t N = 6, in = 7, out = 5, r = 3;
  auto x = randn(N * in, 1), W = randn(out * in, 2), b = randn(out, 3), A = randn(r * in, 4), B = randn(out * r, 5);
  const auto R = randn(N * out, 6);
  const float scale = 1.7f;
  auto f = [&] {
    std::vector<float> y(N * out), u(N * r);
    linear_fwd(x.data(), N, in, W.data(), b.data(), out, y.data());
    lora_fwd(x.data(), N, in, A.data(), B.data(), r, out, scale, u.data(), y.data());
    return dot(y, R);
  };
  std::vector<float> u(N * r), y(N * out);
  lora_fwd(x.data(), N, in, A.data(), B.data(), r, out, scale, u.data(), y.data());
  std::vector<float> dx(N * in, 0.0f), dA(r * in, 0.0f), dB(out * r, 0.0f), dxl(N * in, 0.0f);
  linear_bwd_input(R.data(), N, out, W.data(), in, dx.data());
  lora_bwd(R.data(), x.data(), u.data(), N, in, A.data(), B.data(), r, out, scale, dA.data(), dB.data(), dxl.data());
  for (size_t i = 0; i < dx.size(); ++i) dx[i] += dxl[i];
  check_grad("linear+lora dx", x, dx, f, 1e-2f);
  check_grad("lora dA", A, dA, f, 1e-2f);
  check_grad("lora dB", B, dB, f, 1e-2f);
}

TEST(TrainOps, LayerNormGradients) {
  for (int adversarial = 0; adversarial < 2; ++adversarial) {
    const int64_t N = 4, H = 9;
    // Adversarial: a large common offset with a small spread (cancellation in x - mean).
    auto x = adversarial ? randn(N * H, 11, 0.05f, 30.0f) : randn(N * H, 11);
    auto w = randn(H, 12), b = randn(H, 13);
    const auto R = randn(N * H, 14);
    auto f = [&] {
      std::vector<float> y(N * H), m(N), s(N);
      layer_norm_fwd(x.data(), N, H, w.data(), b.data(), 1e-5, y.data(), m.data(), s.data());
      return dot(y, R);
    };
    std::vector<float> y(N * H), m(N), s(N);
    layer_norm_fwd(x.data(), N, H, w.data(), b.data(), 1e-5, y.data(), m.data(), s.data());
    std::vector<float> dx(N * H, 0.0f), dw(H, 0.0f), db(H, 0.0f);
    layer_norm_bwd(R.data(), x.data(), m.data(), s.data(), w.data(), N, H, dx.data(), dw.data(), db.data());
    check_grad("layernorm dx", x, dx, f, adversarial ? 1e-3f : 1e-2f, adversarial ? 5e-3 : 2e-3);
    check_grad("layernorm dw", w, dw, f, 1e-2f);
    check_grad("layernorm db", b, db, f, 1e-2f);
  }
}

TEST(TrainOps, RmsNormGradients) {
  for (int adversarial = 0; adversarial < 2; ++adversarial) {
    const int64_t N = 4, H = 8;
    // Adversarial: tiny activations where eps matters.
    auto x = adversarial ? randn(N * H, 21, 2e-3f) : randn(N * H, 21);
    auto w = randn(H, 22);
    const auto R = randn(N * H, 23);
    const double eps = 1e-6;
    auto f = [&] {
      std::vector<float> y(N * H), s(N);
      rms_norm_fwd(x.data(), N, H, w.data(), eps, y.data(), s.data());
      return dot(y, R);
    };
    std::vector<float> y(N * H), s(N);
    rms_norm_fwd(x.data(), N, H, w.data(), eps, y.data(), s.data());
    std::vector<float> dx(N * H, 0.0f), dw(H, 0.0f);
    rms_norm_bwd(R.data(), x.data(), s.data(), w.data(), N, H, dx.data(), dw.data());
    check_grad("rmsnorm dx", x, dx, f, adversarial ? 2e-5f : 1e-2f, 5e-3);
    check_grad("rmsnorm dw", w, dw, f, 1e-2f);
  }
}

TEST(TrainOps, RopeGradientAndInverse) {
  const int64_t B = 2, T = 5, heads = 3, D = 8, ld = heads * D + 4;  // extra columns untouched
  calq::io::ModelConfig c;
  c.head_dim = D;
  c.rope_theta = 10000.0;
  std::vector<float> cs, sn;
  rope_tables(calq::engine::rope_inv_freq(c, T), T, cs, sn);
  auto x = randn(B * T * ld, 31);
  const auto R = randn(B * T * ld, 32);
  auto f = [&] {
    auto y = x;
    rope_apply(y.data(), B * T, T, ld, heads, D, cs.data(), sn.data(), false);
    return dot(y, R);
  };
  // The backward of a rotation is the inverse rotation of the upstream gradient.
  auto dx = R;
  rope_apply(dx.data(), B * T, T, ld, heads, D, cs.data(), sn.data(), true);
  check_grad("rope dx", x, dx, f, 1e-2f);
  auto y = x;
  rope_apply(y.data(), B * T, T, ld, heads, D, cs.data(), sn.data(), false);
  rope_apply(y.data(), B * T, T, ld, heads, D, cs.data(), sn.data(), true);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-5f);
}

TEST(TrainOps, AttentionGqaGradientsAndCausality) {
  for (int adversarial = 0; adversarial < 2; ++adversarial) {
    const int64_t B = 2, T = 6, NQ = 4, NKV = 2, D = 4;
    const float scale = 1.0f / 2.0f;
    // Adversarial: large scores, nearly one-hot softmax rows.
    auto q = randn(B * T * NQ * D, 41, adversarial ? 4.0f : 1.0f);
    auto k = randn(B * T * NKV * D, 42, adversarial ? 4.0f : 1.0f);
    auto v = randn(B * T * NKV * D, 43);
    const auto R = randn(B * T * NQ * D, 44);
    auto f = [&] {
      std::vector<float> out(B * T * NQ * D), P(B * NQ * T * T);
      attention_fwd(q.data(), NQ * D, k.data(), v.data(), NKV * D, B, T, NQ, NKV, D, scale, out.data(), P.data());
      return dot(out, R);
    };
    std::vector<float> out(B * T * NQ * D), P(B * NQ * T * T);
    attention_fwd(q.data(), NQ * D, k.data(), v.data(), NKV * D, B, T, NQ, NKV, D, scale, out.data(), P.data());
    std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
    attention_bwd(R.data(), q.data(), NQ * D, k.data(), v.data(), NKV * D, P.data(), B, T, NQ, NKV, D, scale,
                  dq.data(), dk.data(), dv.data());
    const float h = adversarial ? 2e-3f : 1e-2f;
    check_grad("attention dq", q, dq, f, h, 5e-3);
    check_grad("attention dk", k, dk, f, h, 5e-3);
    check_grad("attention dv", v, dv, f, h, 5e-3);
    // Causality: the output at position t does not depend on keys/values after t.
    auto base = out;
    for (size_t i = 0; i < v.size(); ++i)
      if ((i / (NKV * D)) % T == static_cast<size_t>(T - 1)) v[i] += 100.0f;
    std::vector<float> out2(out.size());
    attention_fwd(q.data(), NQ * D, k.data(), v.data(), NKV * D, B, T, NQ, NKV, D, scale, out2.data(), P.data());
    for (size_t i = 0; i < out.size(); ++i)
      if ((i / (NQ * D)) % T != static_cast<size_t>(T - 1)) EXPECT_EQ(out2[i], base[i]);
  }
}

TEST(TrainOps, GeluAndSwigluGradients) {
  auto x = randn(40, 51, 2.0f);
  x[0] = 0.0f;
  x[1] = 9.0f;
  x[2] = -9.0f;
  const auto R = randn(40, 52);
  auto f = [&] {
    std::vector<float> y(x.size());
    gelu_tanh_fwd(x.data(), static_cast<int64_t>(x.size()), y.data());
    return dot(y, R);
  };
  std::vector<float> dx(x.size());
  gelu_tanh_bwd(R.data(), x.data(), static_cast<int64_t>(x.size()), dx.data());
  check_grad("gelu dx", x, dx, f, 1e-2f);
  // GELU-tanh values against the formula in double.
  std::vector<float> y(x.size());
  gelu_tanh_fwd(x.data(), static_cast<int64_t>(x.size()), y.data());
  for (size_t i = 0; i < x.size(); ++i) {
    const double xd = x[i];
    const double ref = 0.5 * xd * (1 + std::tanh(std::sqrt(2 / M_PI) * (xd + 0.044715 * xd * xd * xd)));
    EXPECT_NEAR(y[i], ref, 1e-6 * (1 + std::fabs(ref)));
  }

  auto g = randn(40, 53, 3.0f), u = randn(40, 54);
  g[0] = -30.0f;
  g[1] = 30.0f;
  auto fs = [&] {
    std::vector<float> a(g.size());
    swiglu_fwd(g.data(), u.data(), static_cast<int64_t>(g.size()), a.data());
    return dot(a, R);
  };
  std::vector<float> dg(g.size()), du(g.size());
  swiglu_bwd(R.data(), g.data(), u.data(), static_cast<int64_t>(g.size()), dg.data(), du.data());
  check_grad("swiglu dg", g, dg, fs, 1e-2f);
  check_grad("swiglu du", u, du, fs, 1e-2f);
}

TEST(TrainOps, CrossEntropyShiftedOnce) {
  const std::vector<int32_t> tok = {5, 1, 2, 3, 9, 8, 7, 6};
  const auto tg = shifted_targets(tok, 2, 4);
  EXPECT_EQ(tg, (std::vector<int32_t>{1, 2, 3, -1, 8, 7, 6, -1}));

  const int64_t rows = 8, V = 11;
  for (int adversarial = 0; adversarial < 2; ++adversarial) {
    auto lg = randn(rows * V, 61, adversarial ? 40.0f : 1.0f);
    std::vector<int32_t> t(rows);
    for (int64_t r = 0; r < rows; ++r) t[r] = tg[r] < 0 ? -1 : tg[r];
    // Reference in double.
    double ref = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (t[r] < 0) continue;
      double mx = -1e300, s = 0;
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(lg[r * V + j]));
      for (int64_t j = 0; j < V; ++j) s += std::exp(lg[r * V + j] - mx);
      ref += mx + std::log(s) - lg[r * V + t[r]];
    }
    std::vector<float> d(rows * V);
    const double loss = cross_entropy(lg.data(), rows, V, t.data(), d.data(), 1.0f);
    EXPECT_NEAR(loss, ref, 1e-9 * std::max(1.0, ref));
    auto f = [&] { return cross_entropy(lg.data(), rows, V, t.data(), nullptr, 1.0f); };
    check_grad("cross-entropy dlogits", lg, d, f, adversarial ? 1e-1f : 1e-2f, 5e-3);
    // The last position of each sequence has no target: zero gradient.
    for (int64_t j = 0; j < V; ++j) {
      EXPECT_EQ(d[3 * V + j], 0.0f);
      EXPECT_EQ(d[7 * V + j], 0.0f);
    }
  }
}
