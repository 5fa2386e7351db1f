#include "calq/quant/linalg.h"

#include <climits>

#include "calq/core/error.h"

extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
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
