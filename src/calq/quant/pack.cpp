// pack()/unpack() and packed_layout(): the byte layouts of docs/format.md.
#include <cmath>
#include <cstring>

#include "calq/core/error.h"
#include "calq/quant/format.h"
#include "calq/quant/layout.h"

namespace calq::quant {

namespace {

bool nibble_packed(const Format& f) { return f.family != Family::Int && f.family != Family::FP8; }

}  // namespace

std::vector<PackedTensorDesc> packed_layout(const Format& f, int64_t rows, int64_t cols, bool with_g_idx) {
  std::vector<PackedTensorDesc> out;
  const int64_t G = f.groups_per_row(cols);
  if (f.family == Family::Int) {
    const int64_t pf = values_per_int32(f.bits);
    out.push_back({"weight_packed", DType::I32, {rows, (cols + pf - 1) / pf}});
    out.push_back({"weight_scale", DType::F16, {rows, G}});
    if (!f.symmetric) out.push_back({"weight_zero_point", DType::I32, {(rows + pf - 1) / pf, G}});
    out.push_back({"weight_shape", DType::I64, {2}});
  } else if (f.family == Family::FP8) {
    out.push_back({"weight", DType::F8_E4M3, {rows, cols}});
    out.push_back({"weight_scale", DType::F32, {rows, G}});
  } else {
    out.push_back({"weight_packed", DType::U8, {rows, cols / 2}});
    out.push_back({"weight_scale", f.scale_dtype(), {rows, G}});
    if (f.family == Family::NVFP4) out.push_back({"weight_global_scale", DType::F32, {1}});
    if (f.family == Family::FP4 || f.family == Family::NF4) out.push_back({"weight_shape", DType::I64, {2}});
  }
  if (with_g_idx) out.push_back({"weight_g_idx", DType::I32, {cols}});
  return out;
}

std::map<std::string, Tensor> pack(const QuantizedWeight& q) {
  const Format& f = q.format;
  const int64_t R = q.rows, C = q.cols, G = f.groups_per_row(C);
  std::map<std::string, Tensor> out;
  for (const auto& d : packed_layout(f, R, C, !q.g_idx.empty())) out.emplace(d.suffix, Tensor(d.dtype, d.shape));
  if (f.family == Family::Int) {
    const int64_t pf = values_per_int32(f.bits), words = (C + pf - 1) / pf;
    auto* w = out["weight_packed"].as<uint32_t>();
#pragma omp parallel for schedule(static) if (R * C > (1 << 16))
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        w[r * words + c / pf] |= static_cast<uint32_t>(q.codes[r * C + c]) << (f.bits * (c % pf));
    if (!f.symmetric) {
      auto* z = out["weight_zero_point"].as<uint32_t>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t g = 0; g < G; ++g)
          z[(r / pf) * G + g] |= static_cast<uint32_t>(q.params[r * G + g].zero) << (f.bits * (r % pf));
    }
  } else if (f.family == Family::FP8) {
    std::memcpy(out["weight"].bytes.data(), q.codes.data(), q.codes.size());
  } else {
    auto* w = out["weight_packed"].as<uint8_t>();
    for (int64_t i = 0; i < R * C; i += 2)
      w[i / 2] = static_cast<uint8_t>((q.codes[i] & 15) | ((q.codes[i + 1] & 15) << 4));
  }
  Tensor& s = out["weight_scale"];
  for (int64_t i = 0; i < R * G; ++i) {
    float v = q.params[i].scale;
    switch (s.dtype) {
      case DType::F16: s.as<uint16_t>()[i] = f32_to_f16(v); break;
      case DType::F32: s.as<float>()[i] = v; break;
      case DType::F8_E4M3: s.as<uint8_t>()[i] = f32_to_e4m3(v, true); break;
      case DType::U8: s.as<uint8_t>()[i] = f32_to_e8m0(v, E8M0Round::Floor); break;
      default: fail("internal: scale dtype {}", dtype_name(s.dtype));
    }
  }
  if (out.count("weight_global_scale")) out["weight_global_scale"].as<float>()[0] = q.global_scale;
  if (out.count("weight_shape")) {
    out["weight_shape"].as<int64_t>()[0] = R;
    out["weight_shape"].as<int64_t>()[1] = C;
  }
  if (!q.g_idx.empty()) std::memcpy(out["weight_g_idx"].bytes.data(), q.g_idx.data(), q.g_idx.size() * 4);
  return out;
}

QuantizedWeight unpack(const Format& f, const std::map<std::string, TensorView>& t, const std::string& what) {
  auto get = [&](const std::string& suffix) -> const TensorView& {
    auto it = t.find(suffix);
    CALQ_CHECK(it != t.end(), "{}: missing tensor {}.{} for format {}", what, what, suffix, f.describe());
    return it->second;
  };
  QuantizedWeight q;
  q.format = f;
  // Shape: weight_shape when the layout has it, otherwise from the packed tensor.
  if (f.family == Family::FP8) {
    const auto& w = get("weight");
    CALQ_CHECK(w.shape.size() == 2, "{}: weight must be 2-D, got {}", what, shape_str(w.shape));
    q.rows = w.shape[0];
    q.cols = w.shape[1];
  } else if (t.count("weight_shape")) {
    const auto& s = get("weight_shape");
    CALQ_CHECK(s.dtype == DType::I64 && s.numel() == 2, "{}: weight_shape must be I64 [2], got {} {}", what,
               dtype_name(s.dtype), shape_str(s.shape));
    int64_t rc[2];
    std::memcpy(rc, s.data, 16);
    q.rows = rc[0];
    q.cols = rc[1];
  } else {
    const auto& w = get("weight_packed");
    CALQ_CHECK(w.shape.size() == 2 && nibble_packed(f), "{}: cannot tell the weight shape without weight_shape", what);
    q.rows = w.shape[0];
    q.cols = w.shape[1] * 2;
  }
  with_context(what, [&] { f.check_shape(q.rows, q.cols, what); });
  bool has_g_idx = t.count("weight_g_idx") > 0;
  for (const auto& d : packed_layout(f, q.rows, q.cols, has_g_idx)) {
    const auto& v = get(d.suffix);
    CALQ_CHECK(v.dtype == d.dtype && v.shape == d.shape, "{}: {}.{} is {} {}, expected {} {} for {} [{}, {}]", what,
               what, d.suffix, dtype_name(v.dtype), shape_str(v.shape), dtype_name(d.dtype), shape_str(d.shape),
               f.describe(), q.rows, q.cols);
  }
  const int64_t R = q.rows, C = q.cols, G = f.groups_per_row(C);
  q.codes.assign(static_cast<size_t>(R * C), 0);
  q.params.assign(static_cast<size_t>(R * G), {});
  if (f.family == Family::Int) {
    const int64_t pf = values_per_int32(f.bits), words = (C + pf - 1) / pf;
    const uint32_t mask = (1u << f.bits) - 1;
    std::vector<uint32_t> w(static_cast<size_t>(R * words));
    std::memcpy(w.data(), get("weight_packed").data, w.size() * 4);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        q.codes[r * C + c] = static_cast<uint8_t>((w[r * words + c / pf] >> (f.bits * (c % pf))) & mask);
    if (f.symmetric) {
      for (auto& p : q.params) p.zero = static_cast<float>(1 << (f.bits - 1));
    } else {
      const auto& zv = get("weight_zero_point");
      std::vector<uint32_t> z(static_cast<size_t>(zv.numel()));
      std::memcpy(z.data(), zv.data, z.size() * 4);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t g = 0; g < G; ++g)
          q.params[r * G + g].zero = static_cast<float>((z[(r / pf) * G + g] >> (f.bits * (r % pf))) & mask);
    }
  } else if (f.family == Family::FP8) {
    std::memcpy(q.codes.data(), get("weight").data, q.codes.size());
  } else {
    const auto* w = reinterpret_cast<const uint8_t*>(get("weight_packed").data);
    for (int64_t i = 0; i < R * C; i += 2) {
      q.codes[i] = w[i / 2] & 15;
      q.codes[i + 1] = w[i / 2] >> 4;
    }
  }
  const auto& s = get("weight_scale");
  for (int64_t i = 0; i < R * G; ++i) {
    float v = 0;
    switch (s.dtype) {
      case DType::F16: { uint16_t h; std::memcpy(&h, s.data + 2 * i, 2); v = f16_to_f32(h); break; }
      case DType::F32: std::memcpy(&v, s.data + 4 * i, 4); break;
      case DType::F8_E4M3: v = e4m3_to_f32(static_cast<uint8_t>(s.data[i])); break;
      case DType::U8: v = e8m0_to_f32(static_cast<uint8_t>(s.data[i])); break;
      default: break;
    }
    CALQ_CHECK(std::isfinite(v), "{}: weight_scale[{}] is not finite", what, i);
    q.params[i].scale = v;
  }
  if (f.family == Family::NVFP4) {
    std::memcpy(&q.global_scale, get("weight_global_scale").data, 4);
    CALQ_CHECK(std::isfinite(q.global_scale) && q.global_scale > 0, "{}: weight_global_scale {} must be positive",
               what, q.global_scale);
  }
  if (has_g_idx) {
    q.g_idx.resize(static_cast<size_t>(C));
    std::memcpy(q.g_idx.data(), get("weight_g_idx").data, q.g_idx.size() * 4);
    for (int64_t c = 0; c < C; ++c)
      CALQ_CHECK(q.g_idx[c] >= 0 && q.g_idx[c] < G, "{}: weight_g_idx[{}] = {} is outside [0, {})", what, c, q.g_idx[c], G);
  }
  return q;
}

}  // namespace calq::quant
