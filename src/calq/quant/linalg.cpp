#include "calq/quant/linalg.h"

#include <climits>

#include "calq/core/error.h"

extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dtrtri_(const char* uplo, const char* diag, const int* n, double* a, const int* lda, int* info);
}

namespace calq::quant {

// A row-major matrix is the column-major transpose; for a symmetric matrix both are the same
// matrix, and LAPACK's "lower" factor L (column-major) read row-major is Lᵀ = U.
bool cholesky_upper(std::vector<double>& a, int64_t n) {
  CALQ_CHECK(n > 0 && n <= INT_MAX && static_cast<int64_t>(a.size()) == n * n, "cholesky: bad size {}", n);
  const int nn = static_cast<int>(n);
  int info = 0;
  dpotrf_("L", &nn, a.data(), &nn, &info);
  if (info != 0) return false;
  // Column-major lower = row-major upper: zero the row-major strictly lower part (stale input).
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) a[i * n + j] = 0.0;
  return true;
}

bool inverse_cholesky_upper(std::vector<double>& a, int64_t n) {
  CALQ_CHECK(n > 0 && n <= INT_MAX && static_cast<int64_t>(a.size()) == n * n, "inverse Cholesky: bad size {}", n);
  const int nn = static_cast<int>(n);
  // b = P·a·P (reverse rows and columns); symmetric, so its row-major and column-major layouts
  // coincide.
  std::vector<double> b(a.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) b[i * n + j] = a[(n - 1 - i) * n + (n - 1 - j)];
  int info = 0;
  // Column-major lower L (b = LLᵀ), then L⁻¹ in place (still column-major lower).
  dpotrf_("L", &nn, b.data(), &nn, &info);
  if (info != 0) return false;
  dtrtri_("L", "N", &nn, b.data(), &nn, &info);
  if (info != 0) return false;
  // Column-major element (r, c) of L⁻¹ sits at b[r + c·n]. U[i][j] = L⁻¹[n-1-i][n-1-j] for j >= i.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      a[i * n + j] = j >= i ? b[(n - 1 - i) + (n - 1 - j) * n] : 0.0;
  return true;
}

bool spd_inverse(std::vector<double>& a, int64_t n) {
  CALQ_CHECK(n > 0 && n <= INT_MAX && static_cast<int64_t>(a.size()) == n * n, "inverse: bad size {}", n);
  const int nn = static_cast<int>(n);
  int info = 0;
  dpotrf_("L", &nn, a.data(), &nn, &info);
  if (info != 0) return false;
  dpotri_("L", &nn, a.data(), &nn, &info);
  if (info != 0) return false;
  // dpotri fills the column-major lower triangle (row-major upper): mirror it.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) a[i * n + j] = a[j * n + i];
  return true;
}

}  // namespace calq::quant
