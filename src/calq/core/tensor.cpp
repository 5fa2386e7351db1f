#include "calq/core/tensor.h"

#include <algorithm>
#include <limits>

#include "calq/core/error.h"

namespace calq {

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    CALQ_CHECK(d >= 0, "shape {} has a negative dimension", shape_str(s));
    // Check before multiplying: signed overflow is undefined. A zero dimension makes the product
    // 0 however large the others are.
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d)
      fail("shape {} has more elements than fit in 64 bits", shape_str(s));
    n *= d;
  }
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

Tensor::Tensor(DType t, Shape s) : dtype(t), shape(std::move(s)) {
  const uint64_t nb = with_context(
      fmt::format("tensor of shape {} and dtype {}", shape_str(shape), dtype_name(t)),
      [&] { return dtype_nbytes(t, static_cast<uint64_t>(shape_numel(shape))); });
  CALQ_CHECK(nb <= std::numeric_limits<size_t>::max(), "tensor of shape {} does not fit in memory",
             shape_str(shape));
  bytes.assign(static_cast<size_t>(nb), std::byte{0});
}

std::vector<float> transpose(const std::vector<float>& m, int64_t rows, int64_t cols) {
  const int64_t n = shape_numel({rows, cols});
  CALQ_CHECK(static_cast<int64_t>(m.size()) == n, "transpose: {} elements for a [{}, {}] matrix",
             m.size(), rows, cols);
  std::vector<float> t(m.size());
  // Tiles keep both the rows read and the rows written in cache for large matrices.
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) t[c * rows + r] = m[r * cols + c];
    }
  }
  return t;
}

std::vector<float> to_f32_vector(const TensorView& v) {
  const int64_t n = v.numel();
  CALQ_CHECK(dtype_is_float(v.dtype), "cannot read a {} tensor of shape {} as fp32",
             dtype_name(v.dtype), shape_str(v.shape));
  // The view's byte count must match its shape, or the conversion would read past the data.
  CALQ_CHECK(static_cast<uint64_t>(n) * dtype_size(v.dtype) == v.nbytes,
             "{} tensor of shape {} has {} bytes, expected {}", dtype_name(v.dtype),
             shape_str(v.shape), v.nbytes, static_cast<uint64_t>(n) * dtype_size(v.dtype));
  std::vector<float> out(static_cast<size_t>(n));
  to_f32(v.data, v.dtype, out.data(), out.size());
  return out;
}

}  // namespace calq
