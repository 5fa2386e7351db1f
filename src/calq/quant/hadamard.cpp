#include "calq/quant/hadamard.h"

#include <cmath>

#include <fmt/format.h>

#include "calq/core/error.h"

namespace calq::quant {

namespace {

// Quadratic character of GF(q), q prime: χ(0) = 0, 1 for non-zero squares, −1 otherwise.
int chi(int64_t a, int64_t q) {
  a %= q;
  if (a < 0) a += q;
  if (a == 0) return 0;
  for (int64_t x = 1; x < q; ++x)
    if (x * x % q == a) return 1;
  return -1;
}

// Paley construction I, q prime ≡ 3 (mod 4): order q + 1 (±1 entries).
std::vector<int> paley1(int64_t q) {
  const int64_t n = q + 1;
  std::vector<int> h(static_cast<size_t>(n * n));
  // H = I + S where S = [[0, 1ᵀ], [−1, Q]], Q_ij = χ(j − i).
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int s;
      if (i == 0 && j == 0) s = 0;
      else if (i == 0) s = 1;
      else if (j == 0) s = -1;
      else s = chi(j - i, q);
      h[i * n + j] = s + (i == j ? 1 : 0);
    }
  return h;
}

// Paley construction II, q prime ≡ 1 (mod 4): order 2(q + 1). C = [[0, 1ᵀ], [1, Q]] (symmetric
// conference matrix); each 0 becomes [[1, −1], [−1, −1]], each ±1 becomes ±[[1, 1], [1, −1]].
std::vector<int> paley2(int64_t q) {
  const int64_t m = q + 1, n = 2 * m;
  std::vector<int> c(static_cast<size_t>(m * m));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      if (i == 0 && j == 0) c[0] = 0;
      else if (i == 0 || j == 0) c[i * m + j] = 1;
      else c[i * m + j] = chi(j - i, q);
    }
  std::vector<int> h(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const int v = c[i * m + j];
      int b[2][2];
      if (v == 0) {
        b[0][0] = 1; b[0][1] = -1; b[1][0] = -1; b[1][1] = -1;
      } else {
        b[0][0] = v; b[0][1] = v; b[1][0] = v; b[1][1] = -v;
      }
      for (int a = 0; a < 2; ++a)
        for (int d = 0; d < 2; ++d) h[(2 * i + a) * n + 2 * j + d] = b[a][d];
    }
  return h;
}

std::vector<int> base_matrix(int64_t m) {
  switch (m) {
    case 1: return {1};
    case 12: return paley1(11);
    case 20: return paley1(19);
    case 28: return paley2(13);
    case 40: {  // Sylvester doubling of the order-20 matrix: [[A, A], [A, −A]]
      auto a = paley1(19);
      std::vector<int> h(40 * 40);
      for (int i = 0; i < 20; ++i)
        for (int j = 0; j < 20; ++j) {
          const int v = a[i * 20 + j];
          h[i * 40 + j] = v;
          h[i * 40 + j + 20] = v;
          h[(i + 20) * 40 + j] = v;
          h[(i + 20) * 40 + j + 20] = -v;
        }
      return h;
    }
  }
  fail("no Hadamard base matrix of order {}", m);
}

bool split_order(int64_t n, int64_t& m, int64_t& p2) {
  for (int64_t base : {1, 12, 20, 28, 40}) {
    if (n % base) continue;
    const int64_t r = n / base;
    if (r > 0 && (r & (r - 1)) == 0) {
      m = base;
      p2 = r;
      return true;
    }
  }
  return false;
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void fwht_t(T* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const T a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const T s = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace

bool hadamard_order_supported(int64_t n) {
  int64_t m, p;
  return n >= 1 && split_order(n, m, p);
}

std::vector<double> hadamard_matrix(int64_t n) {
  int64_t m = 0, p2 = 0;
  CALQ_CHECK(n >= 1 && split_order(n, m, p2),
             "no Hadamard matrix of order {} is built in (orders m·2^k with m in 1, 12, 20, 28, 40)", n);
  const auto base = base_matrix(m);
  // Kronecker product Sylvester(p2) ⊗ base: entry (i, j) = (−1)^popcount(i1 & j1) · base[i0][j0].
  std::vector<double> h(static_cast<size_t>(n * n));
  const double s = 1.0 / std::sqrt(static_cast<double>(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i1 = i / m, i0 = i % m, j1 = j / m, j0 = j % m;
      const int sign = (__builtin_popcountll(static_cast<uint64_t>(i1 & j1)) & 1) ? -1 : 1;
      h[i * n + j] = s * sign * base[i0 * m + j0];
    }
  return h;
}

void fwht(float* x, int64_t n) {
  CALQ_CHECK(n >= 1 && (n & (n - 1)) == 0, "fast Walsh–Hadamard needs a power-of-two size, got {}", n);
  fwht_t(x, n);
}

std::vector<float> rotation_signs(int64_t dim, uint64_t seed) {
  std::vector<float> s(static_cast<size_t>(dim));
  uint64_t st = seed;
  for (int64_t i = 0; i < dim; ++i) s[i] = (splitmix(st) >> 63) ? -1.f : 1.f;
  return s;
}

Rotation Rotation::make(int64_t dim, int64_t block, uint64_t seed) {
  Rotation r;
  r.dim = dim;
  r.seed = seed;
  r.signs = rotation_signs(dim, seed);
  if (block == 0 || block == dim) {
    r.block = dim;
    if ((dim & (dim - 1)) != 0) r.full = hadamard_matrix(dim);
  } else {
    CALQ_CHECK(block >= 2 && (block & (block - 1)) == 0, "--hadamard-block must be a power of two or full, got {}",
               block);
    CALQ_CHECK(dim % block == 0, "--hadamard-block {} does not divide the input width {}", block, dim);
    r.block = block;
  }
  return r;
}

std::string Rotation::describe() const {
  return fmt::format("hadamard {} seed {}", block == dim ? fmt::format("full {}", dim) : fmt::format("b{}", block),
                     seed);
}

namespace {
template <typename T>
void apply_rows_t(const Rotation& r, T* x, int64_t rows, bool inverse) {
  std::vector<T> tmp;
#pragma omp parallel for schedule(static) private(tmp) if (rows >= 64)
  for (int64_t i = 0; i < rows; ++i) {
    T* row = x + i * r.dim;
    if (!inverse)
      for (int64_t j = 0; j < r.dim; ++j) row[j] *= r.signs[j];
    if (!r.full.empty()) {
      // y_j = Σ_k x_k H_kj (x·H), or x·Hᵀ for the inverse.
      tmp.assign(static_cast<size_t>(r.dim), T(0));
      for (int64_t k = 0; k < r.dim; ++k) {
        const T xk = row[k];
        if (xk == T(0)) continue;
        if (!inverse)
          for (int64_t j = 0; j < r.dim; ++j) tmp[j] += xk * static_cast<T>(r.full[k * r.dim + j]);
        else
          for (int64_t j = 0; j < r.dim; ++j) tmp[j] += xk * static_cast<T>(r.full[j * r.dim + k]);
      }
      std::copy(tmp.begin(), tmp.end(), row);
    } else {
      // Sylvester Walsh–Hadamard blocks are symmetric: the inverse transform is the same.
      for (int64_t b = 0; b < r.dim; b += r.block) fwht_t(row + b, r.block);
    }
    if (inverse)
      for (int64_t j = 0; j < r.dim; ++j) row[j] *= r.signs[j];
  }
}
}  // namespace

void Rotation::apply_rows(float* x, int64_t rows) const { apply_rows_t(*this, x, rows, false); }
void Rotation::apply_rows(double* x, int64_t rows) const { apply_rows_t(*this, x, rows, false); }
void Rotation::apply_rows_inverse(float* x, int64_t rows) const { apply_rows_t(*this, x, rows, true); }

void Rotation::apply_hessian(std::vector<double>& h) const {
  CALQ_CHECK(static_cast<int64_t>(h.size()) == dim * dim, "rotation of width {} applied to a Hessian of {} values",
             dim, h.size());
  // A = H·R (rows), then Rᵀ·A = (Aᵀ·R)ᵀ: transpose, rotate rows, transpose back.
  apply_rows(h.data(), dim);
  for (int64_t i = 0; i < dim; ++i)
    for (int64_t j = i + 1; j < dim; ++j) std::swap(h[i * dim + j], h[j * dim + i]);
  apply_rows(h.data(), dim);
  for (int64_t i = 0; i < dim; ++i)
    for (int64_t j = i + 1; j < dim; ++j) std::swap(h[i * dim + j], h[j * dim + i]);
}

}  // namespace calq::quant
