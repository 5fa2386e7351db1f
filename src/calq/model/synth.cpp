#include "calq/model/synth.h"

#include <cmath>
#include <vector>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/io/atomic.h"
#include "calq/io/safetensors.h"
#include "calq/model/layout.h"

namespace calq::model {

namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ULL ^ seed;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

// Fills out[0..n) with N(0, std^2) by Box-Muller; chunk c of 4096 values uses its own stream, so
// the result does not depend on how chunks are spread over threads.
void fill_normal(float* out, int64_t n, uint64_t seed, float std) {
  const int64_t chunk = 4096;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t s = seed ^ (static_cast<uint64_t>(c) * 0xD1B54A32D192ED03ULL);
    int64_t begin = c * chunk, end = std::min(n, begin + chunk);
    for (int64_t i = begin; i < end; i += 2) {
      double u1 = (static_cast<double>(splitmix64(s) >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
      double u2 = static_cast<double>(splitmix64(s) >> 11) * 0x1.0p-53;
      double r = std::sqrt(-2.0 * std::log(u1)) * std;
      out[i] = static_cast<float>(r * std::cos(2 * M_PI * u2));
      if (i + 1 < end) out[i + 1] = static_cast<float>(r * std::sin(2 * M_PI * u2));
    }
  }
}

}  // namespace

void write_random_model(const io::ModelConfig& cfg, const std::filesystem::path& out,
                        const SynthOptions& opt) {
  CALQ_CHECK(dtype_is_float(opt.dtype) && dtype_size(opt.dtype) >= 2,
             "random model dtype must be F32, F16 or BF16, not {}", dtype_name(opt.dtype));
  auto tensors = expected_tensors(cfg);
  io::AtomicDir dir(out, opt.overwrite);
  io::SafetensorsWriter w(dir.path(), opt.max_shard_bytes, {{"format", "pt"}, {"source", "calq random model"}});
  uint64_t total = 0;
  for (const auto& t : tensors) {
    w.declare(t.name, opt.dtype, t.shape);
    total += static_cast<uint64_t>(shape_numel(t.shape)) * dtype_size(opt.dtype);
  }
  Progress bar("generate", tensors.size(), "tensors");
  bar.set_total_bytes(total);
  std::vector<float> f;
  std::vector<std::byte> bytes;
  for (const auto& t : tensors) {
    int64_t n = shape_numel(t.shape);
    f.assign(static_cast<size_t>(n), 0.f);
    if (t.is_norm) {
      std::fill(f.begin(), f.end(), 1.f);
    } else if (!t.is_bias) {
      uint64_t seed = hash_name(t.name, opt.seed);
      fill_normal(f.data(), n, seed, opt.std);
      if (opt.outlier_rate > 0 && t.shape.size() == 2) {
        // Scale a few input channels (columns) to mimic activation-outlier-prone weights.
        int64_t cols = t.shape[1], rows = t.shape[0];
        uint64_t s = seed ^ 0xABCDEF;
        for (int64_t c = 0; c < cols; ++c) {
          double u = static_cast<double>(splitmix64(s) >> 11) * 0x1.0p-53;
          if (u < opt.outlier_rate)
            for (int64_t r = 0; r < rows; ++r) f[r * cols + c] *= opt.outlier_scale;
        }
      }
    }
    bytes.resize(static_cast<size_t>(n) * dtype_size(opt.dtype));
    from_f32(f.data(), opt.dtype, bytes.data(), static_cast<size_t>(n));
    w.write(t.name, bytes.data(), bytes.size());
    bar.advance(1, bytes.size(), t.name);
  }
  bar.finish();
  w.finish();
  nlohmann::json c = cfg.raw;
  c["torch_dtype"] = opt.dtype == DType::BF16 ? "bfloat16" : opt.dtype == DType::F16 ? "float16" : "float32";
  if (c.contains("dtype")) c["dtype"] = c["torch_dtype"];
  io::write_file_atomic(dir.path() / "config.json", c.dump(2) + "\n");
  dir.commit();
  log_info("wrote {} ({} tensors, {})", out.string(), tensors.size(), format_bytes(static_cast<double>(total)));
}

}  // namespace calq::model
