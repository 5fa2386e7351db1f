// Helpers shared by calq's tests: temporary directories, running the CLI, a minimal
// safetensors reader written independently of calq's (so tests do not trust the code they test).
#pragma once

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <sys/wait.h>
#include <vector>

namespace calq_test {

namespace fs = std::filesystem;

// CALQ_TEST_SHARED_DIR overrides the ../shared found at build time (the GPU machine gets a copy of
// what its tests need elsewhere).
inline fs::path shared_dir() {
  const char* e = std::getenv("CALQ_TEST_SHARED_DIR");
  return fs::path(e && *e ? e : CALQ_SHARED_DIR);
}
inline fs::path source_dir() { return fs::path(CALQ_SOURCE_DIR); }

// Returns the path of a file under ../shared, or an empty path (the caller skips) when absent.
inline fs::path shared_file(const std::string& rel) {
  fs::path p = shared_dir() / rel;
  return fs::exists(p) ? p : fs::path();
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "calq-test-XXXXXX").string();
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& s) const { return path_ / s; }

 private:
  fs::path path_;
};

struct RunResult {
  int rc = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command, capturing stdout+stderr.
inline RunResult run(const std::string& cmd) {
  RunResult r;
  std::string full = cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int st = pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

inline std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
inline void write_file(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Reads every tensor of one safetensors file with plain file I/O.
inline std::map<std::string, RawTensor> read_safetensors(const fs::path& p) {
  std::string all = read_file(p);
  uint64_t n = 0;
  std::memcpy(&n, all.data(), 8);
  auto header = nlohmann::json::parse(all.substr(8, n));
  std::map<std::string, RawTensor> out;
  for (auto& [name, v] : header.items()) {
    if (name == "__metadata__") continue;
    RawTensor t;
    t.dtype = v["dtype"];
    t.shape = v["shape"].get<std::vector<int64_t>>();
    auto off = v["data_offsets"].get<std::vector<uint64_t>>();
    t.bytes = all.substr(8 + n + off[0], off[1] - off[0]);
    out[name] = std::move(t);
  }
  return out;
}

// Reads every tensor of a model directory (single file or shards).
inline std::map<std::string, RawTensor> read_model_tensors(const fs::path& dir) {
  std::map<std::string, RawTensor> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors")
      for (auto& [k, v] : read_safetensors(e.path())) out[k] = std::move(v);
  return out;
}

// Reference decoders of the 16-bit float formats, written from the IEEE/bfloat16 definitions.
inline float ref_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float ref_f16(uint16_t h) {
  int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 0) v = std::ldexp(m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(1024 + m, e - 25);
  return static_cast<float>(s ? -v : v);
}

// Decodes a raw float tensor (F32, F16, BF16) to float.
inline std::vector<float> raw_to_float(const RawTensor& t) {
  std::vector<float> out;
  if (t.dtype == "F32") {
    out.resize(t.bytes.size() / 4);
    std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  } else if (t.dtype == "BF16" || t.dtype == "F16") {
    out.resize(t.bytes.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      uint16_t h;
      std::memcpy(&h, t.bytes.data() + 2 * i, 2);
      out[i] = t.dtype == "BF16" ? ref_bf16(h) : ref_f16(h);
    }
  } else {
    throw std::runtime_error("raw_to_float: dtype " + t.dtype);
  }
  return out;
}

inline nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_file(p)); }

#ifdef CALQ_BIN
// CALQ_TEST_BIN overrides the calq binary found at build time (a bundle unpacked elsewhere).
inline std::string calq_bin() {
  const char* e = std::getenv("CALQ_TEST_BIN");
  return e && *e ? e : CALQ_BIN;
}

// The files of ../shared that the CLI tests use; ok is false (the test skips) when any is absent.
struct SharedData {
  fs::path m28 = shared_file("data/models/bench-qwen3-28m");
  fs::path m16 = shared_file("data/models/bench-qwen3-16m");
  fs::path wiki = shared_file("data/wikitext-2-raw/wiki.test.raw");
  fs::path v3 = shared_file("data/calibration/calibration_datav3.txt");
  bool ok = !m28.empty() && !m16.empty() && !wiki.empty() && !v3.empty();
};

// A CALQ_DATA directory under t holding links to WikiText-2 test and the v3 calibration text.
inline fs::path calq_data_dir(const TempDir& t, const SharedData& s) {
  const fs::path d = t / "data";
  fs::create_directories(d);
  fs::create_symlink(s.wiki, d / "wiki.test.raw");
  fs::create_symlink(s.v3, d / "calibration_datav3.txt");
  return d;
}

// Runs calq offline with CALQ_DATA = data_dir; `env` is prepended (e.g. "CALQ_TEST_ABORT_AFTER_LAYER=1").
inline RunResult run_calq(const std::string& args, const fs::path& data_dir, const std::string& env = "") {
  return run(env + " CALQ_OFFLINE=1 CALQ_DATA=" + data_dir.string() + " " + calq_bin() + " " + args);
}

// Every file of output directory a is in b with the same bytes, and b has no other file
// (calq_report.json, which holds times, is not compared).
inline void expect_same_files(const fs::path& a, const fs::path& b) {
  std::vector<std::string> names;
  for (auto& e : fs::directory_iterator(a)) names.push_back(e.path().filename().string());
  size_t nb = 0;
  for (auto& e : fs::directory_iterator(b)) nb += e.is_regular_file() ? 1 : 0;
  EXPECT_EQ(names.size(), nb);
  for (auto& n : names) {
    if (n == "calq_report.json") continue;
    ASSERT_TRUE(fs::exists(b / n)) << n;
    EXPECT_TRUE(read_file(a / n) == read_file(b / n)) << n << " differs";
  }
}

// `calq eval --metric kl-divergence` of `model` against `reference` over the first `chunks` chunks
// of WikiText-2 test; the JSON goes to `json_out`. Returns kld_mean (NaN, with a test failure, when
// the run fails).
inline double eval_kld(const fs::path& model, const fs::path& reference, const fs::path& data_dir,
                       const fs::path& json_out, int chunks = 3) {
  const RunResult r = run_calq("-q eval --metric kl-divergence --model " + model.string() + " --reference " +
                                   reference.string() + " --chunks " + std::to_string(chunks) + " --json " +
                                   json_out.string(),
                               data_dir);
  EXPECT_EQ(r.rc, 0) << r.output;
  if (r.rc != 0) return std::nan("");
  return read_json(json_out)["kld_mean"].get<double>();
}
#endif

// Calibration-like inputs with correlated features: x = z·M, z ~ N(0, 1), M = mix·N(0, 1) + I,
// every `outlier_every`-th feature boosted by `boost` (n tokens × cols, row-major).
inline std::vector<float> correlated_inputs(int n, int cols, unsigned seed, float mix = 0.3f, int outlier_every = 7,
                                            float boost = 3.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> M(static_cast<size_t>(cols) * cols);
  for (auto& v : M) v = d(rng) * mix;
  for (int i = 0; i < cols; ++i) M[static_cast<size_t>(i) * cols + i] += 1.f + (i % outlier_every == 0 ? boost : 0.f);
  std::vector<float> X(static_cast<size_t>(n) * cols), z(cols);
  for (int t = 0; t < n; ++t) {
    for (auto& v : z) v = d(rng);
    for (int j = 0; j < cols; ++j) {
      float s = 0;
      for (int k = 0; k < cols; ++k) s += z[k] * M[static_cast<size_t>(k) * cols + j];
      X[static_cast<size_t>(t) * cols + j] = s;
    }
  }
  return X;
}

// Weights ~ N(0, std²), rows × cols.
inline std::vector<float> random_weights(int rows, int cols, unsigned seed, float std = 0.05f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0, std);
  std::vector<float> w(static_cast<size_t>(rows) * cols);
  for (auto& v : w) v = d(rng);
  return w;
}

}  // namespace calq_test
