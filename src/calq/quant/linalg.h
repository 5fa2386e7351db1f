// Dense symmetric linear algebra for GPTQ, through OpenBLAS's LAPACK (column-major Fortran
// interface; our matrices are symmetric, so row/column order only swaps upper and lower).
#pragma once

#include <cstdint>
#include <vector>

namespace calq::quant {

// In place: a (n×n, symmetric positive definite) becomes its Cholesky factor, upper triangular
// U with a = UᵀU (row-major; the strictly lower part is zeroed). Returns false when a is not
// positive definite.
bool cholesky_upper(std::vector<double>& a, int64_t n);
// In place: a (n×n SPD) becomes U, the upper triangular factor of its inverse: a⁻¹ = UᵀU (the
// matrix GPTQ needs). Computed as U = P·L⁻¹·P with P the index reversal and L the lower Cholesky
// factor of P·a·P: one factorization and one triangular inverse (2n³/3 flops, half of inverting
// and factoring again). Returns false when a is not positive definite.
bool inverse_cholesky_upper(std::vector<double>& a, int64_t n);
// In place: a (n×n SPD) becomes its inverse. Returns false when a is not positive definite.
bool spd_inverse(std::vector<double>& a, int64_t n);

}  // namespace calq::quant
