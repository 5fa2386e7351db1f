// Orthonormal Hadamard rotations for MR-GPTQ: block-diagonal Walsh–Hadamard transforms of size
// b ∈ {16 .. 256} (powers of two, O(n log n)), and full-width transforms for sizes m·2^k with
// m ∈ {1, 12, 20, 28, 40} (Kronecker products of a Sylvester matrix with a Paley-construction
// Hadamard matrix), each preceded by a seeded random ±1 sign vector.
//
// The rotation of a width-n input is R = diag(s) · blockdiag(H_b, ..., H_b) (or diag(s) · H_n),
// orthonormal: x ↦ xR for activations, W ↦ WR for weights [out, in], H ↦ RᵀHR for Hessians, so
// (xR)(WR)ᵀ = xWᵀ and GPTQ on (WR, RᵀHR) solves the rotated problem exactly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace calq::quant {

// An orthonormal Hadamard matrix of order n (row-major, entries ±1/√n): n = m·2^k with
// m ∈ {1, 12, 20, 28, 40}. Throws calq::Error for other orders.
std::vector<double> hadamard_matrix(int64_t n);
// Whether hadamard_matrix(n) exists.
bool hadamard_order_supported(int64_t n);

// In place: the orthonormal Walsh–Hadamard transform (Sylvester order, a symmetric matrix with
// entries ±1/√n) of n = 2^k values.
void fwht(float* x, int64_t n);

struct Rotation {
  int64_t dim = 0;
  int64_t block = 0;          // block size; == dim for a full-width transform
  uint64_t seed = 0;
  std::vector<float> signs;   // dim values of ±1
  std::vector<double> full;   // the full-width matrix when block == dim is not a power of two

  // block: a power of two in 16..256 dividing dim, or 0 for full width ("--hadamard-block full").
  static Rotation make(int64_t dim, int64_t block, uint64_t seed);
  std::string describe() const;  // "hadamard b128 seed 7"
  // x (rows × dim, row-major) ← x·R.
  void apply_rows(float* x, int64_t rows) const;
  void apply_rows(double* x, int64_t rows) const;
  // x ← x·Rᵀ (the inverse).
  void apply_rows_inverse(float* x, int64_t rows) const;
  // H (dim × dim, symmetric) ← RᵀHR.
  void apply_hessian(std::vector<double>& h) const;
};

// The seeded sign vector: ±1 from SplitMix64(seed), documented in docs/format.md.
std::vector<float> rotation_signs(int64_t dim, uint64_t seed);

}  // namespace calq::quant
