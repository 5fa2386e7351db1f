#include "calq/core/tensor.h"

#include <limits>

#include "calq/core/error.h"

namespace calq {

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    CALQ_CHECK(d >= 0, "negative dimension in shape {}", shape_str(s));
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d)
      fail("shape {} has more elements than fit in 64 bits", shape_str(s));
    n *= d;
  }
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

Tensor::Tensor(DType t, Shape s) : dtype(t), shape(std::move(s)) {
  bytes.assign(static_cast<size_t>(shape_numel(shape)) * dtype_size(t), std::byte{0});
}

std::vector<float> transpose(const std::vector<float>& m, int64_t rows, int64_t cols) {
  CALQ_CHECK(static_cast<int64_t>(m.size()) == rows * cols, "transpose: {} elements for [{}, {}]", m.size(), rows, cols);
  std::vector<float> t(m.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

std::vector<float> to_f32_vector(const TensorView& v) {
  std::vector<float> out(static_cast<size_t>(v.numel()));
  to_f32(v.data, v.dtype, out.data(), out.size());
  return out;
}

}  // namespace calq
