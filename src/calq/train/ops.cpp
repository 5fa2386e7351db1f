#include "calq/train/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace calq::train {

namespace {
constexpr int64_t kParallelMin = int64_t{1} << 16;
int I(int64_t v) { return static_cast<int>(v); }
}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta, float* C) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(M), I(N), I(K), alpha, A, I(K), B, I(K), beta, C, I(N));
}
void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta, float* C) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(M), I(N), I(K), alpha, A, I(K), B, I(N), beta, C, I(N));
}
void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta, float* C) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, I(M), I(N), I(K), alpha, A, I(M), B, I(N), beta, C, I(N));
}

void linear_fwd(const float* x, int64_t N, int64_t in, const float* W, const float* b, int64_t out, float* y) {
  gemm_nt(N, out, in, 1.0f, x, W, 0.0f, y);
  if (b) {
#pragma omp parallel for schedule(static) if (N * out >= kParallelMin)
    for (int64_t r = 0; r < N; ++r)
      for (int64_t o = 0; o < out; ++o) y[r * out + o] += b[o];
  }
}

void linear_bwd_input(const float* dy, int64_t N, int64_t out, const float* W, int64_t in, float* dx) {
  gemm_nn(N, in, out, 1.0f, dy, W, 1.0f, dx);
}

void lora_fwd(const float* xl, int64_t N, int64_t in, const float* A, const float* B, int64_t r, int64_t out,
              float scale, float* u, float* y) {
  gemm_nt(N, r, in, 1.0f, xl, A, 0.0f, u);
  gemm_nt(N, out, r, scale, u, B, 1.0f, y);
}

void lora_bwd(const float* dy, const float* xl, const float* u, int64_t N, int64_t in, const float* A,
              const float* B, int64_t r, int64_t out, float scale, float* dA, float* dB, float* dxl) {
  // dB[out,r] += scale dy^T u
  gemm_tn(out, r, N, scale, dy, u, 1.0f, dB);
  // du[N,r] = scale dy B
  std::vector<float> du(static_cast<size_t>(N * r));
  gemm_nn(N, r, out, scale, dy, B, 0.0f, du.data());
  // dA[r,in] += du^T xl
  gemm_tn(r, in, N, 1.0f, du.data(), xl, 1.0f, dA);
  if (dxl) gemm_nn(N, in, r, 1.0f, du.data(), A, 1.0f, dxl);
}

void layer_norm_fwd(const float* x, int64_t N, int64_t H, const float* w, const float* b, double eps, float* y,
                    float* mean, float* rstd) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * H;
    float* yr = y + r * H;
    double m = 0, var = 0;
    for (int64_t i = 0; i < H; ++i) m += xr[i];
    m /= static_cast<double>(H);
    for (int64_t i = 0; i < H; ++i) var += (xr[i] - m) * (xr[i] - m);
    var /= static_cast<double>(H);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < H; ++i) yr[i] = static_cast<float>((xr[i] - m) * inv) * w[i] + b[i];
    mean[r] = static_cast<float>(m);
    rstd[r] = static_cast<float>(inv);
  }
}

void layer_norm_bwd(const float* dy, const float* x, const float* mean, const float* rstd, const float* w, int64_t N,
                    int64_t H, float* dx, float* dw, float* db) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* dyr = dy + r * H;
    const float* xr = x + r * H;
    const double m = mean[r], s = rstd[r];
    double a = 0, c = 0;  // mean(dxhat), mean(dxhat * xhat)
    for (int64_t i = 0; i < H; ++i) {
      const double g = static_cast<double>(dyr[i]) * w[i];
      a += g;
      c += g * (xr[i] - m) * s;
    }
    a /= static_cast<double>(H);
    c /= static_cast<double>(H);
    float* dxr = dx + r * H;
    for (int64_t i = 0; i < H; ++i) {
      const double g = static_cast<double>(dyr[i]) * w[i];
      dxr[i] += static_cast<float>(s * (g - a - (xr[i] - m) * s * c));
    }
  }
  if (dw || db) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
    for (int64_t i = 0; i < H; ++i) {
      double sw = 0, sb = 0;
      for (int64_t r = 0; r < N; ++r) {
        sw += static_cast<double>(dy[r * H + i]) * (x[r * H + i] - mean[r]) * rstd[r];
        sb += dy[r * H + i];
      }
      if (dw) dw[i] += static_cast<float>(sw);
      if (db) db[i] += static_cast<float>(sb);
    }
  }
}

void rms_norm_fwd(const float* x, int64_t N, int64_t H, const float* w, double eps, float* y, float* rstd) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * H;
    float* yr = y + r * H;
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(H) + eps));
    for (int64_t i = 0; i < H; ++i) yr[i] = w[i] * (xr[i] * inv);
    rstd[r] = inv;
  }
}

void rms_norm_bwd(const float* dy, const float* x, const float* rstd, const float* w, int64_t N, int64_t H, float* dx,
                  float* dw) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* dyr = dy + r * H;
    const float* xr = x + r * H;
    const double s = rstd[r];
    double c = 0;  // mean(g * x)
    for (int64_t i = 0; i < H; ++i) c += static_cast<double>(dyr[i]) * w[i] * xr[i];
    c /= static_cast<double>(H);
    float* dxr = dx + r * H;
    for (int64_t i = 0; i < H; ++i)
      dxr[i] += static_cast<float>(s * static_cast<double>(dyr[i]) * w[i] - xr[i] * s * s * s * c);
  }
  if (dw) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
    for (int64_t i = 0; i < H; ++i) {
      double sw = 0;
      for (int64_t r = 0; r < N; ++r) sw += static_cast<double>(dy[r * H + i]) * x[r * H + i] * rstd[r];
      dw[i] += static_cast<float>(sw);
    }
  }
}

void rope_tables(const std::vector<float>& inv, int64_t T, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  const int64_t half = static_cast<int64_t>(inv.size());
  cos_t.resize(static_cast<size_t>(T * half));
  sin_t.resize(static_cast<size_t>(T * half));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const float f = static_cast<float>(t) * inv[static_cast<size_t>(i)];  // as the engine (fp32 angle)
      cos_t[static_cast<size_t>(t * half + i)] = std::cos(f);
      sin_t[static_cast<size_t>(t * half + i)] = std::sin(f);
    }
}

void rope_apply(float* x, int64_t N, int64_t T, int64_t ld, int64_t heads, int64_t D, const float* cos_t,
                const float* sin_t, bool inverse) {
  const int64_t half = D / 2;
  const float sgn = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) if (N * ld >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = r % T;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + r * ld + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float c = cos_t[t * half + i], s = sgn * sin_t[t * half + i];
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * c - b * s;
        xh[i + half] = b * c + a * s;
      }
    }
  }
}

void attention_fwd(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldk, int64_t B, int64_t T,
                   int64_t NQ, int64_t NKV, int64_t D, float scale, float* out, float* P) {
  const int64_t groups = NQ / NKV;
  const int prev = openblas_get_num_threads();
  openblas_set_num_threads(1);
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NQ; ++h) {
      const int64_t kh = h / groups, r0 = b * T;
      float* p = P + (b * NQ + h) * T * T;
      const float* qh = q + r0 * ldq + h * D;
      const float* kk = k + r0 * ldk + kh * D;
      const float* vv = v + r0 * ldk + kh * D;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(T), I(T), I(D), scale, qh, I(ldq), kk, I(ldk), 0.0f, p,
                  I(T));
      for (int64_t i = 0; i < T; ++i) {
        float* row = p + i * T;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j]);
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
        for (int64_t j = i + 1; j < T; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(T), I(D), I(T), 1.0f, p, I(T), vv, I(ldk), 0.0f,
                  out + r0 * NQ * D + h * D, I(NQ * D));
    }
  openblas_set_num_threads(prev);
}

void attention_bwd(const float* dout, const float* q, int64_t ldq, const float* k, const float* v, int64_t ldk,
                   const float* P, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D, float scale, float* dq,
                   float* dk, float* dv) {
  const int64_t groups = NQ / NKV;
  const int prev = openblas_get_num_threads();
  openblas_set_num_threads(1);
  // One task per (sequence, kv head): the q heads of a group accumulate into the same dk/dv.
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kh = 0; kh < NKV; ++kh) {
      const int64_t r0 = b * T;
      const float* kk = k + r0 * ldk + kh * D;
      const float* vv = v + r0 * ldk + kh * D;
      float* dkk = dk + r0 * ldk + kh * D;
      float* dvv = dv + r0 * ldk + kh * D;
      for (int64_t t = 0; t < T; ++t) {
        std::fill(dkk + t * ldk, dkk + t * ldk + D, 0.0f);
        std::fill(dvv + t * ldk, dvv + t * ldk + D, 0.0f);
      }
      std::vector<float> dp(static_cast<size_t>(T * T));
      for (int64_t h = kh * groups; h < (kh + 1) * groups; ++h) {
        const float* p = P + (b * NQ + h) * T * T;
        const float* dO = dout + r0 * NQ * D + h * D;
        const int64_t ldo = NQ * D;
        // dv += P^T dO
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, I(T), I(D), I(T), 1.0f, p, I(T), dO, I(ldo), 1.0f, dvv,
                    I(ldk));
        // dP = dO V^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(T), I(T), I(D), 1.0f, dO, I(ldo), vv, I(ldk), 0.0f,
                    dp.data(), I(T));
        // dS = P * (dP - rowsum(dP * P))
        for (int64_t i = 0; i < T; ++i) {
          float* dr = dp.data() + i * T;
          const float* pr = p + i * T;
          double s = 0;
          for (int64_t j = 0; j <= i; ++j) s += static_cast<double>(dr[j]) * pr[j];
          const float sf = static_cast<float>(s);
          for (int64_t j = 0; j <= i; ++j) dr[j] = pr[j] * (dr[j] - sf);
          for (int64_t j = i + 1; j < T; ++j) dr[j] = 0.0f;
        }
        // dq = scale dS K ; dk += scale dS^T Q
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(T), I(D), I(T), scale, dp.data(), I(T), kk, I(ldk),
                    0.0f, dq + r0 * ldq + h * D, I(ldq));
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, I(T), I(D), I(T), scale, dp.data(), I(T),
                    q + r0 * ldq + h * D, I(ldq), 1.0f, dkk, I(ldk));
      }
    }
  openblas_set_num_threads(prev);
}

namespace {
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)
}

void gelu_tanh_fwd(const float* x, int64_t n, float* y) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const double xd = x[i];
    y[i] = static_cast<float>(0.5 * xd * (1.0 + std::tanh(kGeluC * (xd + 0.044715 * xd * xd * xd))));
  }
}

void gelu_tanh_bwd(const float* dy, const float* x, int64_t n, float* dx) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const double xd = x[i];
    const double t = std::tanh(kGeluC * (xd + 0.044715 * xd * xd * xd));
    const double d = 0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * kGeluC * (1.0 + 3.0 * 0.044715 * xd * xd);
    dx[i] = static_cast<float>(dy[i] * d);
  }
}

void swiglu_fwd(const float* g, const float* u, int64_t n, float* a) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-g[i]));
    a[i] = g[i] * s * u[i];
  }
}

void swiglu_bwd(const float* da, const float* g, const float* u, int64_t n, float* dg, float* du) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-g[i]));
    const float silu = g[i] * s;
    du[i] = da[i] * silu;
    dg[i] = da[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

std::vector<int32_t> shifted_targets(const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
  std::vector<int32_t> t(static_cast<size_t>(B * T), -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i + 1 < T; ++i) t[static_cast<size_t>(b * T + i)] = tokens[static_cast<size_t>(b * T + i + 1)];
  return t;
}

double cross_entropy(const float* logits, int64_t rows, int64_t V, const int32_t* targets, float* dlogits,
                     float grad_scale) {
  double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (rows * V >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * V;
    const int32_t tg = targets[r];
    if (tg < 0) {
      if (dlogits) std::fill(dlogits + r * V, dlogits + (r + 1) * V, 0.0f);
      continue;
    }
    float mx = l[0];
    for (int64_t j = 1; j < V; ++j) mx = std::max(mx, l[j]);
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(l[j]) - mx);
    const double lse = mx + std::log(sum);
    total += lse - l[tg];
    if (dlogits) {
      float* d = dlogits + r * V;
      for (int64_t j = 0; j < V; ++j) d[j] = static_cast<float>(std::exp(static_cast<double>(l[j]) - lse)) * grad_scale;
      d[tg] -= grad_scale;
    }
  }
  return total;
}

}  // namespace calq::train
