// Runs calq's GPTQ on the W and H that bench/gptq_reference.py saved with the reference code's
// result, and prints agreement (codes, Hessian error) and time against the reference.
// Usage: gptq_compare_tool CASE.npz [CASE.npz ...]
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <string>
#include <vector>

#include "calq/core/error.h"
#include "calq/data/archive.h"
#include "calq/quant/gptq.h"

namespace {

struct Array {
  std::vector<int64_t> shape;
  std::string dtype;
  std::string data;
  double scalar() const {
    if (dtype == "<f8") { double v; std::memcpy(&v, data.data(), 8); return v; }
    if (dtype == "<i8") { int64_t v; std::memcpy(&v, data.data(), 8); return static_cast<double>(v); }
    calq::fail("unsupported scalar dtype {}", dtype);
  }
  template <typename T>
  std::vector<T> as() const {
    std::vector<T> out(data.size() / (dtype == "<f8" ? 8 : 4));
    if (dtype == "<f4") {
      std::vector<float> f(out.size());
      std::memcpy(f.data(), data.data(), data.size());
      for (size_t i = 0; i < f.size(); ++i) out[i] = static_cast<T>(f[i]);
    } else if (dtype == "<f8") {
      std::vector<double> f(out.size());
      std::memcpy(f.data(), data.data(), data.size());
      for (size_t i = 0; i < f.size(); ++i) out[i] = static_cast<T>(f[i]);
    } else {
      calq::fail("unsupported dtype {}", dtype);
    }
    return out;
  }
};

// A .npy file: magic, version, header length, a Python dict header, then C-order data.
Array parse_npy(const std::string& b, const std::string& what) {
  CALQ_CHECK(b.size() > 10 && b.compare(0, 6, "\x93NUMPY") == 0, "{} is not a .npy array", what);
  const int major = static_cast<unsigned char>(b[6]);
  size_t hl, off;
  if (major == 1) {
    hl = static_cast<unsigned char>(b[8]) | (static_cast<unsigned char>(b[9]) << 8);
    off = 10;
  } else {
    uint32_t h;
    std::memcpy(&h, b.data() + 8, 4);
    hl = h;
    off = 12;
  }
  const std::string h = b.substr(off, hl);
  Array a;
  auto q = h.find("'descr': '");
  CALQ_CHECK(q != std::string::npos, "{}: no descr", what);
  a.dtype = h.substr(q + 10, h.find('\'', q + 10) - q - 10);
  CALQ_CHECK(h.find("'fortran_order': False") != std::string::npos, "{}: Fortran order", what);
  auto s = h.find("'shape': (");
  auto e = h.find(')', s);
  std::string dims = h.substr(s + 10, e - s - 10);
  size_t p = 0;
  while (p < dims.size()) {
    size_t c = dims.find(',', p);
    std::string t = dims.substr(p, c == std::string::npos ? std::string::npos : c - p);
    if (t.find_first_not_of(' ') != std::string::npos) a.shape.push_back(std::stoll(t));
    if (c == std::string::npos) break;
    p = c + 1;
  }
  a.data = b.substr(off + hl);
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: gptq_compare_tool CASE.npz...\n");
    return 2;
  }
  fmt::print("| shape | format | act-order | threads | ref s | calq s | speed-up | same codes | H-err calq/ref |\n");
  fmt::print("|---|---|---|---|---|---|---|---|---|\n");
  try {
    for (int i = 1; i < argc; ++i) {
      std::map<std::string, Array> z;
      for (auto& m : calq::data::zip_members(argv[i]))
        z[m.substr(0, m.size() - 4)] = parse_npy(calq::data::zip_extract(argv[i], m), m);
      auto W = z.at("W").as<float>(), Q = z.at("Q").as<float>();
      auto H = z.at("H").as<double>();
      const int64_t rows = z.at("W").shape[0], cols = z.at("W").shape[1];
      const int bits = static_cast<int>(z.at("bits").scalar()), group = static_cast<int>(z.at("group").scalar());
      const bool sym = z.at("sym").scalar() != 0, act = z.at("act_order").scalar() != 0,
                 stat = z.at("static_groups").scalar() != 0;
      const int threads = static_cast<int>(z.at("threads").scalar());
      omp_set_num_threads(threads);
      auto f = calq::quant::Format::parse("int" + std::to_string(bits), group, sym);
      calq::quant::GptqOptions o;
      o.act_order = act;
      o.static_groups = stat;
      auto t0 = std::chrono::steady_clock::now();
      auto r = calq::quant::gptq_quantize(W.data(), rows, cols, H, f, o);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      auto mine = r.q.dequantize();
      size_t same = 0;
      for (size_t k = 0; k < mine.size(); ++k)
        same += std::fabs(mine[k] - Q[k]) <= 1e-6f * std::max(1.f, std::fabs(Q[k]));
      const double e_mine = calq::quant::hessian_error(W.data(), mine.data(), rows, cols, H);
      const double e_ref = calq::quant::hessian_error(W.data(), Q.data(), rows, cols, H);
      const double ref_s = z.at("seconds").scalar();
      fmt::print("| {}×{} | {} | {} | {} | {:.3f} | {:.3f} | {:.2f}× | {:.4f}% | {:.5f} |\n", rows, cols, f.describe(),
                 act ? (stat ? "static groups" : "g_idx") : "no", threads, ref_s, secs, ref_s / secs,
                 100.0 * same / mine.size(), e_mine / e_ref);
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
