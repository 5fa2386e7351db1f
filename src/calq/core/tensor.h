// Tensor views and a small owning tensor. Shapes are row-major; a 2-D weight [out, in] is stored
// with `in` contiguous (the PyTorch/safetensors convention).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "calq/core/dtype.h"

namespace calq {

using Shape = std::vector<int64_t>;

int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[512, 1536]"

// A non-owning view of typed bytes.
struct TensorView {
  DType dtype = DType::F32;
  Shape shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const { return shape_numel(shape); }
};

// An owning byte buffer with dtype and shape.
struct Tensor {
  DType dtype = DType::F32;
  Shape shape;
  std::vector<std::byte> bytes;

  Tensor() = default;
  Tensor(DType t, Shape s);  // zero-filled, sized by dtype_size(t) * numel
  TensorView view() const { return {dtype, shape, bytes.data(), bytes.size()}; }
  int64_t numel() const { return shape_numel(shape); }
  template <typename T> T* as() { return reinterpret_cast<T*>(bytes.data()); }
  template <typename T> const T* as() const { return reinterpret_cast<const T*>(bytes.data()); }
};

// The transpose of a row-major [rows, cols] matrix, as a new [cols, rows] matrix.
std::vector<float> transpose(const std::vector<float>& m, int64_t rows, int64_t cols);

// Copies a view's float data (any float dtype) into a new fp32 vector.
std::vector<float> to_f32_vector(const TensorView& v);

}  // namespace calq
