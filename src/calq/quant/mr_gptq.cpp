#include "calq/quant/mr_gptq.h"

#include "calq/backend/device.h"
#include "calq/core/error.h"

namespace calq::quant {

MrGptqResult mr_gptq_quantize(const float* w, int64_t rows, int64_t cols, const std::vector<double>& h,
                              const Format& f, const MrGptqOptions& o, const std::string& what) {
  CALQ_CHECK(o.scale_grid >= 1 && o.scale_min > 0 && o.scale_min <= 1,
             "scale search: grid {} and minimum {} (need grid >= 1, 0 < minimum <= 1)", o.scale_grid, o.scale_min);
  CALQ_CHECK(o.scale_search_p > 0, "--scale-search-p must be positive, got {}", o.scale_search_p);
  MrGptqResult out;
  GptqOptions g = o.gptq;
  g.clip_search = o.scale_grid > 1;
  g.clip_grid = o.scale_grid;
  g.clip_min = o.scale_min;
  g.clip_norm = static_cast<float>(o.scale_search_p);
  if (!o.rotate) {
    out.gptq = gptq_quantize(w, rows, cols, h, f, g, what);
    return out;
  }
  Rotation r = with_context(what, [&] { return Rotation::make(cols, o.hadamard_block, o.seed); });
  std::vector<float> wr(w, w + rows * cols);
  std::vector<double> hr = h;
  if (g.cuda && backend::cuda_hadamard_supported(r)) {
    // On the GPU with --device cuda: the same bits as the CPU's transforms (backend/device.h).
    // Full-width rotations of other orders are computed on the CPU (same result either way).
    with_context(what, [&] {
      backend::cuda_hadamard_rows(r, wr.data(), rows, false);
      backend::cuda_rotate_hessian(r, hr);
    });
  } else {
    r.apply_rows(wr.data(), rows);
    r.apply_hessian(hr);
  }
  out.gptq = gptq_quantize(wr.data(), rows, cols, hr, f, g, what);
  out.rotation = std::move(r);
  return out;
}

std::vector<float> mr_gptq_dequantize(const MrGptqResult& r) {
  std::vector<float> d = r.gptq.q.dequantize();
  if (r.rotation) r.rotation->apply_rows_inverse(d.data(), r.gptq.q.rows);
  return d;
}

}  // namespace calq::quant
