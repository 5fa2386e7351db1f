// The GPU forward pass (engine::Options::device = Cuda) against the CPU engine, the reference, on
// the tiny dense fixtures of tests/data/engine (label "gpu"; every test skips when this calq has no
// CUDA backend or no usable GPU is visible): logits on random right-padded batches, one longer than
// the attention kernel's tiles (fp32 and bf16), transformers' reference logits, the observer's
// inputs, set_weight / clear_weight, input transforms, the unsupported-architecture and
// out-of-memory errors.
//
// bf16 cases run on a copy of the fixture whose tensors are rounded to bf16 (what --gpu-precision
// bf16 stores exactly; three fixtures are bf16 already): CPU and GPU then multiply the same weights.
//
// Error of a batch = max over real token rows of max_j |gpu_j - cpu_j| / max_j |cpu_j| (padding
// rows are meaningless by contract). Each test prints its errors ("[ parity ]" lines).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "calq/backend/device.h"
#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/io/safetensors.h"
#include "gpu_support.h"
#include "support.h"

namespace {

using namespace calq;
using calq_test::fs::path;


path fixture(const std::string& name) { return calq_test::source_dir() / "tests/data/engine" / name; }

// Every fixture of an architecture the GPU path runs (the MoE ones are refused, tested below).
const std::vector<std::string> kDense = {"llama_gqa",  "llama_mha_bias_tied", "llama3_rope", "llama_linear_rope",
                                         "mistral_swa", "qwen2_bias",         "qwen3_qknorm", "qwen3_mha", "gpt2"};

engine::Options options(backend::Device d, engine::Precision p = engine::Precision::F32) {
  engine::Options o;
  o.device = d;
  o.gpu_precision = p;
  o.allow_long_context = true;  // the long batch is longer than the fixtures' max_position_embeddings
  return o;
}

// A copy of fixture `fx` in dir with every float tensor rounded to bf16 and stored as BF16.
path bf16_copy(const std::string& fx, const path& dir) {
  const path out = dir / (fx + "_bf16");
  calq_test::fs::create_directories(out);
  for (const auto& e : calq_test::fs::directory_iterator(fixture(fx))) {
    const std::string n = e.path().filename().string();
    if (e.path().extension() != ".safetensors" && n != "model.safetensors.index.json")
      calq_test::fs::copy(e.path(), out / n);
  }
  auto ck = io::Checkpoint::open(fixture(fx));
  io::SafetensorsWriter w(out, UINT64_MAX, {});
  const auto names = ck.names();
  for (const auto& n : names) {
    const auto& i = ck.info(n);
    w.declare(n, dtype_is_float(i.dtype) ? DType::BF16 : i.dtype, i.shape);
  }
  for (const auto& n : names) {
    const TensorView v = ck.view(n);
    if (!dtype_is_float(v.dtype)) {
      w.write(n, v.data, v.nbytes);
      continue;
    }
    std::vector<float> f(static_cast<size_t>(v.numel()));
    to_f32(v.data, v.dtype, f.data(), f.size());
    std::vector<uint16_t> b(f.size());
    for (size_t k = 0; k < f.size(); ++k) b[k] = f32_to_bf16(f[k]);
    w.write(n, b.data(), b.size() * sizeof(uint16_t));
  }
  w.finish();
  return out;
}

engine::Batch random_batch(int64_t B, int64_t T, int64_t V, std::vector<int64_t> lengths, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  engine::Batch b;
  b.batch = B;
  b.seq = T;
  b.tokens.resize(static_cast<size_t>(B * T));
  for (auto& t : b.tokens) t = tok(rng);
  b.lengths = std::move(lengths);
  return b;
}

bool is_real(const engine::Batch& b, int64_t row) {
  return b.lengths.empty() || row % b.seq < b.lengths[static_cast<size_t>(row / b.seq)];
}

// max over real rows of max_j |x_j - ref_j| / max_j |ref_j|.
double rel_err(const std::vector<float>& ref, const std::vector<float>& x, const engine::Batch& b, int64_t V) {
  EXPECT_EQ(ref.size(), x.size());
  if (ref.size() != x.size()) return INFINITY;
  double worst = 0;
  for (int64_t r = 0; r < b.batch * b.seq; ++r) {
    if (!is_real(b, r)) continue;
    double d = 0, m = 0;
    for (int64_t j = 0; j < V; ++j) {
      const size_t i = static_cast<size_t>(r * V + j);
      d = std::max(d, std::abs(static_cast<double>(x[i]) - ref[i]));
      m = std::max(m, std::abs(static_cast<double>(ref[i])));
    }
    worst = std::max(worst, d / m);
  }
  return worst;
}

const char* name(engine::Precision p) { return p == engine::Precision::F32 ? "fp32" : "bf16"; }
double tolerance(engine::Precision p) { return p == engine::Precision::F32 ? 1e-5 : 1e-3; }

struct Case {
  std::string fixture;
  engine::Precision precision;
};
std::string case_name(const ::testing::TestParamInfo<Case>& i) {
  return i.param.fixture + "_" + name(i.param.precision);
}
std::vector<Case> all_cases() {
  std::vector<Case> c;
  for (const auto& f : kDense)
    for (auto p : {engine::Precision::F32, engine::Precision::BF16}) c.push_back({f, p});
  return c;
}

class GpuEngine : public ::testing::TestWithParam<Case> {};

// Random batches: 3 sequences of 20 with right padding (lengths 20, 13, 1) and 2 of 200 (lengths
// 200, 77), longer than the attention tiles (32 queries × 32 keys) and than the fixtures'
// max_position_embeddings; mistral_swa's window (5) is then far shorter than the sequence. GPT-2's
// positions are learned (64 in the fixture): 2 of 60 (lengths 60, 37) instead.
TEST_P(GpuEngine, LogitsMatchCpu) {
  REQUIRE_GPU();
  const Case c = GetParam();
  calq_test::TempDir tmp;
  const path dir = c.precision == engine::Precision::F32 ? fixture(c.fixture) : bf16_copy(c.fixture, tmp.path());
  auto cpu = engine::Model::load(dir, options(backend::Device::Cpu));
  auto gpu = engine::Model::load(dir, options(backend::Device::Cuda, c.precision));
  const int64_t V = cpu.config().vocab_size;
  const std::vector<engine::Batch> batches{random_batch(3, 20, V, {20, 13, 1}, 1),
                                           c.fixture == "gpt2" ? random_batch(2, 60, V, {60, 37}, 2)
                                                               : random_batch(2, 200, V, {200, 77}, 2),
                                           random_batch(1, 7, V, {}, 3)};
  for (const auto& b : batches) {
    const auto ref = cpu.forward(b);
    const auto got = gpu.forward(b);
    const double e = rel_err(ref, got, b, V);
    std::printf("[ parity ] %s %s B=%lld T=%lld: max rel err %.3e\n", c.fixture.c_str(), name(c.precision),
                static_cast<long long>(b.batch), static_cast<long long>(b.seq), e);
    EXPECT_LE(e, tolerance(c.precision)) << c.fixture << " B=" << b.batch << " T=" << b.seq;
    // The layer-by-layer API (activations through the host between layers) gives the same logits.
    engine::Activations h = gpu.embed(b);
    for (int64_t l = 0; l < gpu.num_layers(); ++l) gpu.run_layer(l, h);
    const auto layered = gpu.head(h);
    EXPECT_LE(rel_err(got, layered, b, V), 1e-6) << "layer by layer";
    // logits_from: the rows first..T-1 of each sequence of forward's logits.
    const int64_t first = b.seq / 2;
    const auto tail = gpu.logits_from(b, first);
    ASSERT_EQ(static_cast<int64_t>(tail.size()), b.batch * (b.seq - first) * V);
    // (The head's product has other shapes here, so cuBLAS may sum in another order.)
    double d = 0, mx = 0;
    for (int64_t s = 0; s < b.batch; ++s)
      for (int64_t t = first; t < b.seq; ++t)
        for (int64_t j = 0; j < V; ++j) {
          const float want = got[static_cast<size_t>((s * b.seq + t) * V + j)];
          d = std::max(d, static_cast<double>(std::abs(tail[static_cast<size_t>((s * (b.seq - first) + t - first) * V + j)] - want)));
          mx = std::max(mx, static_cast<double>(std::abs(want)));
        }
    EXPECT_LE(d / mx, 1e-5) << "logits_from";
  }
}

// transformers' logits (float64 reference of the fixture, tests/data/engine/*/expected.safetensors):
// the bound of the CPU engine's own parity test (1e-4), fp32 only.
TEST_P(GpuEngine, MatchesTransformers) {
  REQUIRE_GPU();
  const Case c = GetParam();
  if (c.precision != engine::Precision::F32) GTEST_SKIP() << "fp32 only";
  auto f = io::SafetensorsFile::open(fixture(c.fixture) / "expected.safetensors");
  auto gpu = engine::Model::load(fixture(c.fixture), options(backend::Device::Cuda));
  const int64_t V = gpu.config().vocab_size;
  const auto sh = f->info("tokens").shape;
  engine::Batch b;
  b.batch = sh[0];
  b.seq = sh[1];
  auto tv = f->view("tokens");
  b.tokens.resize(static_cast<size_t>(tv.numel()));
  std::memcpy(b.tokens.data(), tv.data, tv.nbytes);
  auto read = [&](const std::string& n) {
    auto v = f->view(n);
    std::vector<float> out(static_cast<size_t>(v.numel()));
    to_f32(v.data, v.dtype, out.data(), out.size());
    return out;
  };
  const double e = rel_err(read("logits"), gpu.forward(b), b, V);
  auto lv = f->view("lengths");
  std::vector<int32_t> len(static_cast<size_t>(lv.numel()));
  std::memcpy(len.data(), lv.data, lv.nbytes);
  b.lengths.assign(len.begin(), len.end());
  const double ep = rel_err(read("logits_pad"), gpu.forward(b), b, V);
  std::printf("[ parity ] %s vs transformers: max rel err %.3e (plain) %.3e (padded)\n", c.fixture.c_str(), e, ep);
  EXPECT_LE(e, 1e-4);
  EXPECT_LE(ep, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Dense, GpuEngine, ::testing::ValuesIn(all_cases()), case_name);

struct Seen {
  std::vector<std::string> modules;
  int64_t layer, rows, cols, expert;
  std::vector<float> x;
  std::vector<uint8_t> real;
};
class Recorder : public engine::Observer {
 public:
  std::vector<Seen> seen;
  void on_linear_input(const engine::LinearInput& in) override {
    seen.push_back({in.modules, in.layer, in.rows, in.cols, in.expert, std::vector<float>(in.x, in.x + in.rows * in.cols),
                    std::vector<uint8_t>(in.real, in.real + in.rows)});
  }
};

// The observer sees the same groups, in the same order, with the same inputs as on the CPU.
TEST(GpuEngineObserver, SameInputsAsCpu) {
  REQUIRE_GPU();
  for (const auto& fx : kDense) {
    auto cpu = engine::Model::load(fixture(fx), options(backend::Device::Cpu));
    auto gpu = engine::Model::load(fixture(fx), options(backend::Device::Cuda));
    const auto b = random_batch(2, 40, cpu.config().vocab_size, {40, 23}, 5);
    Recorder rc, rg;
    cpu.forward(b, &rc);
    gpu.forward(b, &rg);
    ASSERT_EQ(rc.seen.size(), rg.seen.size()) << fx;
    ASSERT_EQ(rc.seen.size(), static_cast<size_t>(4 * cpu.num_layers() + 1)) << fx;
    double worst = 0;
    for (size_t i = 0; i < rc.seen.size(); ++i) {
      const Seen &a = rc.seen[i], &g = rg.seen[i];
      ASSERT_EQ(a.modules, g.modules) << fx << " call " << i;
      EXPECT_EQ(a.layer, g.layer);
      EXPECT_EQ(a.rows, g.rows);
      EXPECT_EQ(a.cols, g.cols);
      EXPECT_EQ(a.expert, g.expert);
      EXPECT_EQ(a.real, g.real);
      ASSERT_EQ(a.x.size(), g.x.size());
      double d = 0, m = 0;
      for (size_t j = 0; j < a.x.size(); ++j) {
        if (!a.real[j / static_cast<size_t>(a.cols)]) continue;
        d = std::max(d, static_cast<double>(std::abs(a.x[j] - g.x[j])));
        m = std::max(m, static_cast<double>(std::abs(a.x[j])));
      }
      worst = std::max(worst, d / m);
    }
    std::printf("[ parity ] %s observer inputs (%zu calls): max rel err %.3e\n", fx.c_str(), rc.seen.size(), worst);
    EXPECT_LE(worst, 1e-5) << fx;
  }
}

// set_weight changes the GPU logits exactly as the CPU's; clear_weight restores them.
TEST(GpuEngineWeights, SetWeightAndClear) {
  REQUIRE_GPU();
  struct W {
    std::string fx;
    std::vector<std::string> modules;
    std::vector<engine::Precision> precisions;
  };
  const std::vector<std::string> llama{"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                                       "model.layers.0.self_attn.q_proj"};
  // The llama fixtures are bf16 checkpoints (the weights set below are rounded to bf16 for the bf16
  // case); gpt2 is fp32, its Conv1D weights exchanged as [out, in].
  for (const W& c : std::vector<W>{
           {"llama_mha_bias_tied", llama, {engine::Precision::F32, engine::Precision::BF16}},
           {"qwen3_qknorm", llama, {engine::Precision::F32, engine::Precision::BF16}},
           {"gpt2", {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"}, {engine::Precision::F32}}}) {
    const char* fx = c.fx.c_str();
    for (auto prec : c.precisions) {
      auto cpu = engine::Model::load(fixture(fx), options(backend::Device::Cpu));
      auto gpu = engine::Model::load(fixture(fx), options(backend::Device::Cuda, prec));
      const int64_t V = cpu.config().vocab_size;
      const auto b = random_batch(2, 24, V, {24, 10}, 9);
      const auto before = gpu.forward(b);
      std::mt19937 rng(3);
      std::normal_distribution<float> nd(0.f, 0.05f);
      for (const std::string& m : c.modules) {
        auto w = cpu.weight(m);
        for (auto& x : w) {
          x = 1.5f * x + nd(rng);
          if (prec == engine::Precision::BF16) x = bf16_to_f32(f32_to_bf16(x));
        }
        cpu.set_weight(m, w);
        gpu.set_weight(m, w);
      }
      const auto ref = cpu.forward(b), got = gpu.forward(b);
      const double e = rel_err(ref, got, b, V), moved = rel_err(before, got, b, V);
      std::printf("[ parity ] %s %s after set_weight: max rel err %.3e (logits moved by %.3e)\n", fx, name(prec), e,
                  moved);
      EXPECT_LE(e, tolerance(prec)) << fx;
      EXPECT_GE(moved, 100 * tolerance(prec)) << "set_weight did not change the GPU logits";
      for (const std::string& m : c.modules) gpu.clear_weight(m);
      EXPECT_LE(rel_err(before, gpu.forward(b), b, V), 1e-6) << "clear_weight";
    }
  }
}

// An input transform runs on the module's input before its product, as on the CPU (and modules
// sharing that input are then observed and multiplied one by one).
TEST(GpuEngineWeights, InputTransform) {
  REQUIRE_GPU();
  auto cpu = engine::Model::load(fixture("llama_gqa"), options(backend::Device::Cpu));
  auto gpu = engine::Model::load(fixture("llama_gqa"), options(backend::Device::Cuda));
  const int64_t V = cpu.config().vocab_size;
  const auto b = random_batch(2, 30, V, {30, 17}, 4);
  const auto before = gpu.forward(b);
  auto t = [](float* x, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) x[r * cols + c] *= (c % 2 ? 0.5f : -1.25f);
  };
  for (auto* m : {&cpu, &gpu}) {
    m->set_input_transform("model.layers.0.mlp.gate_proj", t);
    m->set_input_transform("model.layers.1.self_attn.k_proj", t);
  }
  Recorder rc, rg;
  const auto ref = cpu.forward(b, &rc), got = gpu.forward(b, &rg);
  const double e = rel_err(ref, got, b, V);
  std::printf("[ parity ] llama_gqa with input transforms: max rel err %.3e (moved %.3e)\n", e,
              rel_err(before, got, b, V));
  EXPECT_LE(e, 1e-5);
  EXPECT_GE(rel_err(before, got, b, V), 1e-3);
  ASSERT_EQ(rc.seen.size(), rg.seen.size());
  for (size_t i = 0; i < rc.seen.size(); ++i) EXPECT_EQ(rc.seen[i].modules, rg.seen[i].modules);
}

// Architectures the GPU path does not implement (MoE) are an error naming them and --device cpu.
TEST(GpuEngineErrors, UnsupportedArchitecture) {
  REQUIRE_GPU();
  for (const auto& [fx, arch] : std::vector<std::pair<std::string, std::string>>{
           {"qwen3_moe_norm", "qwen3_moe"}, {"mixtral", "mixtral"}}) {
    try {
      engine::Model::load(fixture(fx), options(backend::Device::Cuda));
      ADD_FAILURE() << fx << " loaded on the GPU";
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("does not support " + arch), std::string::npos) << m;
      EXPECT_NE(m.find("--device cpu"), std::string::npos) << m;
    }
  }
}

// Not enough GPU memory for the weights: the error gives the bytes needed and free
// (CALQ_CUDA_MEMORY_LIMIT caps the free memory the engine sees).
TEST(GpuEngineErrors, OutOfMemory) {
  REQUIRE_GPU();
  setenv("CALQ_CUDA_MEMORY_LIMIT", "1000", 1);
  try {
    engine::Model::load(fixture("llama_gqa"), options(backend::Device::Cuda));
    ADD_FAILURE() << "loaded with 1000 bytes";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of GPU memory: the weights need"), std::string::npos) << m;
    EXPECT_NE(m.find("1000 bytes are free"), std::string::npos) << m;
    EXPECT_NE(m.find("--gpu-precision bf16"), std::string::npos) << m;
  }
  unsetenv("CALQ_CUDA_MEMORY_LIMIT");
  // Weights fit, the activations of a batch do not.
  auto gpu = engine::Model::load(fixture("llama_gqa"), options(backend::Device::Cuda));
  const int64_t V = gpu.config().vocab_size;
  setenv("CALQ_CUDA_MEMORY_LIMIT", "20000", 1);
  try {
    gpu.forward(random_batch(4, 512, V, {}, 1));
    ADD_FAILURE() << "ran with 20000 bytes";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of GPU memory"), std::string::npos) << m;
    EXPECT_NE(m.find("--batch"), std::string::npos) << m;
  }
  unsetenv("CALQ_CUDA_MEMORY_LIMIT");
  EXPECT_NO_THROW(gpu.forward(random_batch(1, 8, V, {}, 1)));  // and the model still works
}

}  // namespace
