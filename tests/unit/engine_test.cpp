// Engine: parity with transformers on tiny fixtures of every architecture (tests/data/engine,
// made by scripts/fixtures/make_engine_fixtures.py), reference attention/RoPE, observer contract,
// set_weight, padding, errors, calq quantized outputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <cstring>
#include <limits>
#include <random>

#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/engine/gemm.h"
#include "calq/engine/router.h"
#include "calq/io/safetensors.h"
#include "calq/pipeline/quantize.h"
#include "support.h"

using namespace calq;
using calq_test::fs::path;

namespace {

path fixture(const std::string& name) { return calq_test::source_dir() / "tests/data/engine" / name; }

struct Expected {
  int64_t B = 0, T = 0, V = 0;
  std::vector<int32_t> tokens;
  std::vector<int64_t> lengths;
  std::vector<float> logits, logits_pad;
};

std::vector<float> read_f32(const io::SafetensorsFile& f, const std::string& n) {
  auto v = f.view(n);
  std::vector<float> out(static_cast<size_t>(v.numel()));
  to_f32(v.data, v.dtype, out.data(), out.size());
  return out;
}
std::vector<int32_t> read_i32(const io::SafetensorsFile& f, const std::string& n) {
  auto v = f.view(n);
  EXPECT_EQ(v.dtype, DType::I32);
  std::vector<int32_t> out(static_cast<size_t>(v.numel()));
  std::memcpy(out.data(), v.data, v.nbytes);
  return out;
}

Expected load_expected(const path& dir) {
  auto f = io::SafetensorsFile::open(dir / "expected.safetensors");
  Expected e;
  auto sh = f->info("tokens").shape;
  e.B = sh[0];
  e.T = sh[1];
  e.V = io::load_config(dir).vocab_size;
  e.tokens = read_i32(*f, "tokens");
  for (int32_t l : read_i32(*f, "lengths")) e.lengths.push_back(l);
  {
    EXPECT_EQ(f->info("logits").shape, (Shape{e.B, e.T, e.V}));
    e.logits = read_f32(*f, "logits");
    e.logits_pad = read_f32(*f, "logits_pad");
  }
  return e;
}

// Error of one row: max_j |got_j - ref_j| / max_j |ref_j| (relative to the row's largest logit).
double row_rel_err(const float* got, const float* ref, int64_t V) {
  double d = 0, m = 0;
  for (int64_t j = 0; j < V; ++j) {
    d = std::max(d, std::abs(static_cast<double>(got[j]) - ref[j]));
    m = std::max(m, std::abs(static_cast<double>(ref[j])));
  }
  return d / std::max(m, 1e-30);
}

// Max over the real rows of the batch.
double max_rel_err(const std::vector<float>& got, const std::vector<float>& ref, int64_t B, int64_t T,
                   int64_t V, const std::vector<int64_t>& lengths) {
  double e = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < (lengths.empty() ? T : lengths[b]); ++t) {
      const int64_t r = b * T + t;
      e = std::max(e, row_rel_err(got.data() + r * V, ref.data() + r * V, V));
    }
  return e;
}

const char* kFixtures[] = {"llama_gqa",       "llama_mha_bias_tied", "llama3_rope",      "llama_linear_rope",
                           "mistral_swa",     "qwen2_bias",          "qwen3_qknorm",     "qwen3_mha",
                           "qwen3_moe_norm",  "qwen3_moe_sparse",    "qwen3_moe_step2",  "mixtral",
                           "gpt2"};

class Parity : public ::testing::TestWithParam<const char*> {};

TEST_P(Parity, LogitsMatchTransformers) {
  const path dir = fixture(GetParam());
  Expected e = load_expected(dir);
  ASSERT_FALSE(e.logits.empty());
  auto m = engine::Model::load(dir);
  engine::Batch b{e.B, e.T, e.tokens, {}};
  auto logits = m.forward(b);
  ASSERT_EQ(static_cast<int64_t>(logits.size()), e.B * e.T * e.V);
  const double err = max_rel_err(logits, e.logits, e.B, e.T, e.V, {});
  b.lengths = e.lengths;
  auto logits_pad = m.forward(b);
  const double err_pad = max_rel_err(logits_pad, e.logits_pad, e.B, e.T, e.V, e.lengths);
  std::printf("[parity] %-20s max rel err %.3g (padded batch %.3g)\n", GetParam(), err, err_pad);
  EXPECT_LT(err, 1e-4);
  EXPECT_LT(err_pad, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) { return std::string(info.param); });

TEST(EngineParity, ShuffledTokensDoNotMatch) {  // the comparison can fail
  Expected e = load_expected(fixture("llama_gqa"));
  auto m = engine::Model::load(fixture("llama_gqa"));
  auto toks = e.tokens;
  std::swap(toks[3], toks[4]);
  auto logits = m.forward({e.B, e.T, toks, {}});
  EXPECT_GT(max_rel_err(logits, e.logits, e.B, e.T, e.V, {}), 1e-2);
}

TEST(EngineParity, BenchQwen3_28m) {
  const path dir = calq_test::shared_file("data/models/bench-qwen3-28m");
  if (dir.empty()) GTEST_SKIP() << "../shared/data/models/bench-qwen3-28m absent";
  auto f = io::SafetensorsFile::open(fixture("bench_qwen3_28m.safetensors"));
  auto toks = read_i32(*f, "tokens");
  auto idx = read_i32(*f, "top_idx");
  auto val = read_f32(*f, "top_val");
  auto lse = read_f32(*f, "lse");
  auto maxabs = read_f32(*f, "max_abs");
  auto fl = read_f32(*f, "first_last");
  const int64_t T = static_cast<int64_t>(toks.size()), K = f->info("top_idx").shape[1];
  auto m = engine::Model::load(dir);
  const int64_t V = m.config().vocab_size;
  auto logits = m.forward({1, T, toks, {}});
  double err = 0, err_lse = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * V;
    for (int64_t j = 0; j < K; ++j)
      err = std::max(err, std::abs(row[idx[t * K + j]] - static_cast<double>(val[t * K + j])) / maxabs[t]);
    double mx = *std::max_element(row, row + V), s = 0;
    for (int64_t j = 0; j < V; ++j) s += std::exp(row[j] - mx);
    err_lse = std::max(err_lse, std::abs(mx + std::log(s) - lse[t]) / maxabs[t]);
  }
  const double err_first = row_rel_err(logits.data(), fl.data(), V);
  const double err_last = row_rel_err(logits.data() + (T - 1) * V, fl.data() + V, V);
  std::printf("[parity] bench-qwen3-28m T=%ld top-%ld max rel err %.3g, logsumexp %.3g, full rows %.3g %.3g\n",
              static_cast<long>(T), static_cast<long>(K), err, err_lse, err_first, err_last);
  EXPECT_LT(err, 1e-4);
  EXPECT_LT(err_lse, 1e-4);
  EXPECT_LT(err_first, 1e-4);
  EXPECT_LT(err_last, 1e-4);
}

// ---- reference attention / RoPE ------------------------------------------------------------
TEST(EngineReference, AttentionHeadMatchesNaiveSoftmax) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 1);
  const int64_t T = 9, D = 6;
  for (int64_t kv_len : {9, 5})
    for (int64_t window : {0, 3}) {
      std::vector<float> q(T * D), k(T * D), v(T * D), out(T * D);
      for (auto* x : {&q, &k, &v})
        for (float& f : *x) f = nd(rng);
      const float scale = 0.37f;
      engine::attention_head(q.data(), D, k.data(), D, v.data(), D, out.data(), D, T, D, kv_len, window, scale);
      for (int64_t i = 0; i < std::min(T, kv_len); ++i) {
        // full T x T scores with -inf outside the mask, then softmax, in double
        std::vector<double> s(T);
        double mx = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          bool ok = j <= i && j < kv_len && (window == 0 || i - j < window);
          double d = 0;
          for (int64_t t = 0; t < D; ++t) d += static_cast<double>(q[i * D + t]) * k[j * D + t];
          s[j] = ok ? d * scale : -INFINITY;
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (double& x : s) z += (x = std::exp(x - mx));
        for (int64_t t = 0; t < D; ++t) {
          double o = 0;
          for (int64_t j = 0; j < T; ++j) o += s[j] / z * v[j * D + t];
          EXPECT_NEAR(out[i * D + t], o, 1e-5) << "i=" << i << " kv_len=" << kv_len << " window=" << window;
        }
      }
    }
}

// The order of attention_head's arithmetic, which the GPU's exact mode reproduces
// (src/calq/backend/cuda/exact_kernels.cu, one block per query row): queries in blocks of 64; a
// row's products run over the keys [kstart, kend) of its block; scores = scale · (an FMA chain
// over d restarted every 512 terms); the visible scores' max (NaN left out), fast_exp of the
// differences, their sum in 8 interleaved fp64 lanes ((0+1)+(2+3))+((4+5)+(6+7)) with the tail
// in lane 0, times float(1/Σ); zeros elsewhere; then Σ_j p_j·v_j over all the block's keys in
// chains of 512. Written here as that scalar loop and compared bit for bit, on shapes around 64
// and 512 (both chains restart), windows, short lengths and scores large enough to underflow.
TEST(EngineReference, AttentionHeadIsTheExactModeOrder) {
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0, 1);
  struct Case {
    int64_t T, D, kv_len, window;
    float spread;
  };
  const Case cases[] = {{1, 8, 1, 0, 1},      {63, 16, 63, 0, 1},   {65, 64, 65, 0, 4},   {130, 32, 100, 0, 1},
                        {130, 32, 130, 40, 2}, {700, 8, 700, 0, 1}, {700, 8, 650, 600, 1}, {70, 520, 70, 0, 0.2f},
                        {200, 24, 200, 1, 1},  {129, 16, 129, 64, 30}};
  for (const Case& c : cases) {
    const int64_t T = c.T, D = c.D, ld = D + 3;
    std::vector<float> q(T * ld), k(T * ld), v(T * ld), out(T * ld, NAN);
    for (auto* x : {&q, &k, &v})
      for (float& f : *x) f = nd(rng) * c.spread;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    engine::attention_head(q.data(), ld, k.data(), ld, v.data(), ld, out.data(), ld, T, D, c.kv_len, c.window, scale);
    int bad = 0;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t i0 = i / 64 * 64, i1 = std::min(T, i0 + 64), kend = std::min(i1, c.kv_len);
      const int64_t kstart = c.window > 0 ? std::max<int64_t>(0, i0 - c.window + 1) : 0, nk = kend - kstart;
      std::vector<float> ref(D, 0.0f), s(std::max<int64_t>(nk, 0));
      if (nk > 0) {
        for (int64_t j = 0; j < nk; ++j) {
          float sc = 0.0f;
          for (int64_t d0 = 0; d0 < D; d0 += 512) {
            float acc = 0.0f;
            for (int64_t d = d0; d < std::min(D, d0 + 512); ++d) acc = std::fma(q[i * ld + d], k[(kstart + j) * ld + d], acc);
            sc = d0 == 0 ? scale * acc : scale * acc + sc;
          }
          s[j] = sc;
        }
        const int64_t hi = std::min(i, c.kv_len - 1), lo = c.window > 0 ? std::max<int64_t>(0, i - c.window + 1) : 0;
        if (hi < lo) {
          std::fill(s.begin(), s.end(), 0.0f);
        } else {
          float* vis = s.data() + (lo - kstart);
          const int64_t nv = hi - lo + 1;
          float mx = -INFINITY;
          for (int64_t j = 0; j < nv; ++j) mx = vis[j] > mx ? vis[j] : mx;
          for (int64_t j = 0; j < nv; ++j) vis[j] = engine::fast_exp(vis[j] - mx);
          double part[8] = {};
          for (int l = 0; l < 8; ++l)
            for (int64_t j = 0; j + 8 <= nv; j += 8) part[l] += vis[j + l];
          for (int64_t j = nv - nv % 8; j < nv; ++j) part[0] += vis[j];
          const double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
          const float inv = static_cast<float>(1.0 / sum);
          for (int64_t j = 0; j < nk; ++j) s[j] = j < lo - kstart || j > hi - kstart ? 0.0f : s[j] * inv;
        }
        for (int64_t d = 0; d < D; ++d) {
          float o = 0.0f;
          for (int64_t j0 = 0; j0 < nk; j0 += 512) {
            float acc = 0.0f;
            for (int64_t j = j0; j < std::min(nk, j0 + 512); ++j) acc = std::fma(s[j], v[(kstart + j) * ld + d], acc);
            o = j0 == 0 ? acc : acc + o;
          }
          ref[d] = o;
        }
      }
      for (int64_t d = 0; d < D; ++d)
        if (std::memcmp(&out[i * ld + d], &ref[d], sizeof(float)) != 0 && bad++ < 3)
          ADD_FAILURE() << "T " << T << " D " << D << " kv_len " << c.kv_len << " window " << c.window << ": out[" << i
                        << "][" << d << "] = " << out[i * ld + d] << ", the exact-mode order gives " << ref[d];
    }
  }
}

io::ModelConfig rope_cfg(const std::string& scaling) {
  nlohmann::json j = {{"model_type", "llama"}, {"vocab_size", 16}, {"hidden_size", 64}, {"intermediate_size", 8},
                      {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"num_key_value_heads", 2},
                      {"max_position_embeddings", 4096}, {"rope_theta", 500000.0}};
  if (scaling == "linear") j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 4.0}};
  if (scaling == "llama3")
    j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  return io::parse_config(j);
}

TEST(EngineReference, RopeInverseFrequencies) {
  const double theta = 500000.0;
  const int D = 32;
  auto def = engine::rope_inv_freq(rope_cfg(""), 10);
  auto lin = engine::rope_inv_freq(rope_cfg("linear"), 10);
  auto l3 = engine::rope_inv_freq(rope_cfg("llama3"), 10);
  ASSERT_EQ(def.size(), 16u);
  int low = 0, mid = 0, high = 0;
  for (int i = 0; i < D / 2; ++i) {
    const double f = 1.0 / std::pow(theta, 2.0 * i / D);
    EXPECT_NEAR(def[i], f, 2e-6 * f);
    EXPECT_NEAR(lin[i], f / 4.0, 2e-6 * f);
    // llama3 (Meta's reference): wavelength above old_len/low -> f/factor; below old_len/high -> f;
    // between: interpolate with smooth = (old_len/wavelen - low)/(high - low).
    const double wl = 2 * M_PI / f, old_len = 8192;
    double want;
    if (wl < old_len / 4.0) {
      want = f;
      ++high;
    } else if (wl > old_len / 1.0) {
      want = f / 8.0;
      ++low;
    } else {
      const double s = (old_len / wl - 1.0) / (4.0 - 1.0);
      want = (1 - s) * f / 8.0 + s * f;
      ++mid;
    }
    EXPECT_NEAR(l3[i], want, 2e-6 * f) << i;
  }
  EXPECT_GT(low, 0);
  EXPECT_GT(mid, 0);
  EXPECT_GT(high, 0);
}

TEST(EngineReference, UnsupportedRopeIsAnError) {
  auto c = rope_cfg("linear");
  c.rope_scaling.type = "longrope";
  EXPECT_THROW(engine::rope_inv_freq(c, 4), Error);
}

// An independent float64 GPT-2 forward (LayerNorm, learned positions, Conv1D [in, out] weights,
// causal softmax attention, gelu_new, tied head) straight from the checkpoint tensors.
std::vector<double> gpt2_reference(const native::Model& src, const std::vector<int32_t>& toks, int64_t T) {
  const auto& c = src.config();
  const int64_t H = c.hidden_size, NH = c.num_attention_heads, D = H / NH, I = c.intermediate_size, V = c.vocab_size;
  auto ld = [&](const std::string& n) { auto v = src.load_f32(n); return std::vector<double>(v.begin(), v.end()); };
  auto wte = ld("transformer.wte.weight"), wpe = ld("transformer.wpe.weight");
  std::vector<double> x(T * H);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i) x[t * H + i] = wte[toks[t] * H + i] + wpe[t * H + i];
  auto ln = [&](const std::vector<double>& in, const std::string& p) {
    auto w = ld(p + ".weight"), b = ld(p + ".bias");
    std::vector<double> y(in.size());
    for (int64_t t = 0; t < T; ++t) {
      double mu = 0, var = 0;
      for (int64_t i = 0; i < H; ++i) mu += in[t * H + i] / H;
      for (int64_t i = 0; i < H; ++i) var += (in[t * H + i] - mu) * (in[t * H + i] - mu) / H;
      for (int64_t i = 0; i < H; ++i) y[t * H + i] = (in[t * H + i] - mu) / std::sqrt(var + c.rms_norm_eps) * w[i] + b[i];
    }
    return y;
  };
  auto conv1d = [&](const std::vector<double>& in, int64_t nin, const std::string& p, int64_t nout) {
    auto w = ld(p + ".weight"), b = ld(p + ".bias");  // [in, out]
    std::vector<double> y(T * nout);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < nout; ++o) {
        double s = b[o];
        for (int64_t i = 0; i < nin; ++i) s += in[t * nin + i] * w[i * nout + o];
        y[t * nout + o] = s;
      }
    return y;
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "transformer.h." + std::to_string(l) + ".";
    auto qkv = conv1d(ln(x, p + "ln_1"), H, p + "attn.c_attn", 3 * H);
    std::vector<double> att(T * H, 0.0);
    for (int64_t hd = 0; hd < NH; ++hd)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(i + 1);
        double mx = -INFINITY, z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double d = 0;
          for (int64_t t = 0; t < D; ++t) d += qkv[i * 3 * H + hd * D + t] * qkv[j * 3 * H + H + hd * D + t];
          s[j] = d / std::sqrt(double(D));
          mx = std::max(mx, s[j]);
        }
        for (auto& v : s) z += (v = std::exp(v - mx));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t t = 0; t < D; ++t) att[i * H + hd * D + t] += s[j] / z * qkv[j * 3 * H + 2 * H + hd * D + t];
      }
    auto o = conv1d(att, H, p + "attn.c_proj", H);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    auto f = conv1d(ln(x, p + "ln_2"), H, p + "mlp.c_fc", I);
    for (auto& v : f) v = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    auto m = conv1d(f, I, p + "mlp.c_proj", H);
    for (size_t i = 0; i < x.size(); ++i) x[i] += m[i];
  }
  auto xf = ln(x, "transformer.ln_f");
  std::vector<double> logits(T * V);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t v = 0; v < V; ++v) {
      double s = 0;
      for (int64_t i = 0; i < H; ++i) s += xf[t * H + i] * wte[v * H + i];
      logits[t * V + v] = s;
    }
  return logits;
}

TEST(EngineReference, Gpt2MatchesFloat64Reference) {
  Expected e = load_expected(fixture("gpt2"));
  auto m = engine::Model::load(fixture("gpt2"));
  const int64_t V = e.V;
  std::vector<int32_t> toks(e.tokens.begin(), e.tokens.begin() + e.T);
  auto ref = gpt2_reference(m.source(), toks, e.T);
  auto got = m.forward({1, e.T, toks, {}});
  std::vector<float> reff(ref.begin(), ref.end());
  const double err = max_rel_err(got, reff, 1, e.T, V, {});
  std::printf("[parity] gpt2 (float64 reference) max rel err %.3g\n", err);
  EXPECT_LT(err, 1e-5);
}

// ---- observer --------------------------------------------------------------------------------
struct Recorder : engine::Observer {
  struct Rec {
    engine::LinearInput in;
    std::vector<float> x;
    std::vector<uint8_t> real;
    std::vector<int64_t> rows;
    std::vector<float> rw;
  };
  std::vector<Rec> recs;
  std::vector<engine::Routing> routes;
  std::vector<std::vector<float>> route_logits, route_w;
  std::vector<std::vector<int32_t>> route_e;
  void on_linear_input(const engine::LinearInput& in) override {
    Rec r{in, std::vector<float>(in.x, in.x + in.rows * in.cols), std::vector<uint8_t>(in.real, in.real + in.rows), {}, {}};
    if (in.expert >= 0) {
      r.rows.assign(in.token_rows, in.token_rows + in.rows);
      r.rw.assign(in.routing_weight, in.routing_weight + in.rows);
    }
    r.in.x = nullptr;
    recs.push_back(std::move(r));
  }
  void on_routing(const engine::Routing& ro) override {
    routes.push_back(ro);
    route_logits.emplace_back(ro.router_logits, ro.router_logits + ro.rows * ro.num_experts);
    route_w.emplace_back(ro.weights, ro.weights + ro.rows * ro.top_k);
    route_e.emplace_back(ro.experts, ro.experts + ro.rows * ro.top_k);
  }
  const Rec& find(const std::string& module, int64_t expert = -1) const {
    for (const auto& r : recs)
      if (r.in.expert == expert && std::find(r.in.modules.begin(), r.in.modules.end(), module) != r.in.modules.end())
        return r;
    throw std::runtime_error("not observed: " + module);
  }
};

// out = x W^T in double
std::vector<double> ref_linear(const std::vector<float>& x, int64_t rows, int64_t in, const std::vector<float>& w,
                               int64_t out) {
  std::vector<double> y(rows * out);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += static_cast<double>(x[r * in + i]) * w[o * in + i];
      y[r * out + o] = s;
    }
  return y;
}

// Observer::done_after: the layer stops right after the input the observer asked for; what it saw
// is exactly the start of a full run (same groups, same bytes), for every stopping point, on a
// dense llama and on GPT-2; a full run after a stopped one is unaffected.
TEST(EngineObserver, DoneAfterStopsTheLayerThere) {
  struct StopAt : Recorder {
    std::string module;
    bool done_after(const engine::LinearInput& in) const override {
      return std::find(in.modules.begin(), in.modules.end(), module) != in.modules.end();
    }
  };
  for (const char* fx : {"llama_gqa", "gpt2"}) {
    Expected e = load_expected(fixture(fx));
    auto m = engine::Model::load(fixture(fx));
    engine::Batch b{e.B, e.T, e.tokens, e.lengths};
    const auto h0 = m.embed(b);
    Recorder full;
    auto h = h0;
    m.run_layer(0, h, &full);
    ASSERT_EQ(full.recs.size(), 4u) << fx;
    for (size_t k = 0; k < full.recs.size(); ++k) {
      StopAt s;
      s.module = full.recs[k].in.modules.back();
      auto hs = h0;
      m.run_layer(0, hs, &s);
      ASSERT_EQ(s.recs.size(), k + 1) << fx << " stop at " << s.module;
      for (size_t i = 0; i <= k; ++i) {
        EXPECT_EQ(s.recs[i].in.modules, full.recs[i].in.modules);
        EXPECT_EQ(s.recs[i].x, full.recs[i].x) << fx << " input " << i;
      }
    }
    auto again = h0;
    m.run_layer(0, again, nullptr);
    EXPECT_EQ(again.data, h.data) << fx;
  }
}

TEST(EngineObserver, DenseInputsAreTheModulesInputs) {
  Expected e = load_expected(fixture("llama_gqa"));
  auto m = engine::Model::load(fixture("llama_gqa"));
  engine::Batch b{e.B, e.T, e.tokens, e.lengths};
  auto h = m.embed(b);
  const auto h0 = h.data;
  Recorder rec;
  m.run_layer(0, h, &rec);
  ASSERT_EQ(rec.recs.size(), 4u);  // {q,k,v}, o, {gate,up}, down
  const auto& qkv = rec.find("model.layers.0.self_attn.q_proj");
  EXPECT_EQ(qkv.in.modules, (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                                      "model.layers.0.self_attn.v_proj"}));
  EXPECT_EQ(qkv.in.layer, 0);
  const int64_t N = e.B * e.T, H = 32;
  ASSERT_EQ(qkv.in.rows, N);
  ASSERT_EQ(qkv.in.cols, H);
  for (int64_t r = 0; r < N; ++r) EXPECT_EQ(qkv.real[r], (r % e.T) < e.lengths[r / e.T] ? 1 : 0);
  // q_proj's input is RMSNorm(embedding) (norm weight from the checkpoint)
  auto nw = m.source().load_f32("model.layers.0.input_layernorm.weight");
  for (int64_t r = 0; r < N; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(h0[r * H + i]) * h0[r * H + i];
    const double inv = 1 / std::sqrt(ss / H + m.config().rms_norm_eps);
    for (int64_t i = 0; i < H; ++i) ASSERT_NEAR(qkv.x[r * H + i], h0[r * H + i] * inv * nw[i], 1e-5);
  }
  // down_proj's input is silu(gate(x)) * up(x), x = the observed gate/up input
  const auto& gu = rec.find("model.layers.0.mlp.up_proj");
  const auto& dn = rec.find("model.layers.0.mlp.down_proj");
  const int64_t I = m.in_features("model.layers.0.mlp.down_proj");
  auto g = ref_linear(gu.x, N, H, m.weight("model.layers.0.mlp.gate_proj"), I);
  auto u = ref_linear(gu.x, N, H, m.weight("model.layers.0.mlp.up_proj"), I);
  for (int64_t i = 0; i < N * I; ++i) ASSERT_NEAR(dn.x[i], g[i] / (1 + std::exp(-g[i])) * u[i], 1e-5);
  // the layer output is h_mid + down(x_down) where h_mid = h0 + o_proj(x_o)
  const auto& o = rec.find("model.layers.0.self_attn.o_proj");
  auto yo = ref_linear(o.x, N, o.in.cols, m.weight("model.layers.0.self_attn.o_proj"), H);
  auto yd = ref_linear(dn.x, N, I, m.weight("model.layers.0.mlp.down_proj"), H);
  for (int64_t i = 0; i < N * H; ++i) ASSERT_NEAR(h.data[i], h0[i] + yo[i] + yd[i], 1e-5);
  // the head: logits = observed lm_head input x lm_head weight
  m.run_layer(1, h, nullptr);
  Recorder rh;
  auto logits = m.head(h, &rh);
  const auto& hd = rh.find("lm_head");
  EXPECT_EQ(hd.in.layer, 2);
  auto ref = ref_linear(hd.x, N, H, m.source().load_f32("lm_head.weight"), e.V);
  for (int64_t i = 0; i < N * e.V; ++i) ASSERT_NEAR(logits[i], ref[i], 1e-4);
}

TEST(EngineObserver, Gpt2ModuleNamesAndConv1D) {
  Expected e = load_expected(fixture("gpt2"));
  auto m = engine::Model::load(fixture("gpt2"));
  auto h = m.embed({e.B, e.T, e.tokens, {}});
  const auto h0 = h.data;
  Recorder rec;
  m.run_layer(1, h, &rec);
  std::vector<std::string> names;
  for (const auto& r : rec.recs) names.push_back(r.in.modules.at(0));
  EXPECT_EQ(names, (std::vector<std::string>{"transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                             "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"}));
  // weight() is [out, in]: the transpose of the stored Conv1D [in, out]
  auto stored = m.source().load_f32("transformer.h.1.mlp.c_fc.weight");
  auto w = m.weight("transformer.h.1.mlp.c_fc");
  const int64_t in = m.in_features("transformer.h.1.mlp.c_fc"), out = m.out_features("transformer.h.1.mlp.c_fc");
  EXPECT_EQ(in, 32);
  EXPECT_EQ(out, 128);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) ASSERT_EQ(w[o * in + i], stored[i * out + o]);
  // c_proj(mlp) input = gelu_new(c_fc(x) + b)
  const auto& fc = rec.find("transformer.h.1.mlp.c_fc");
  const auto& pr = rec.find("transformer.h.1.mlp.c_proj");
  auto y = ref_linear(fc.x, fc.in.rows, in, w, out);
  auto bias = m.source().load_f32("transformer.h.1.mlp.c_fc.bias");
  for (int64_t r = 0; r < fc.in.rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      const double x = y[r * out + o] + bias[o];
      const double gl = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
      ASSERT_NEAR(pr.x[r * out + o], gl, 1e-5);
    }
}

TEST(EngineObserver, MoeExpertsAndRouting) {
  for (const char* name : {"qwen3_moe_sparse", "mixtral"}) {
    SCOPED_TRACE(name);
    Expected e = load_expected(fixture(name));
    auto m = engine::Model::load(fixture(name));
    const auto& c = m.config();
    auto h = m.embed({e.B, e.T, e.tokens, e.lengths});
    Recorder rec;
    const int64_t layer = 1;
    m.run_layer(0, h, nullptr);
    m.run_layer(layer, h, &rec);
    ASSERT_EQ(rec.routes.size(), 1u);
    const auto& ro = rec.routes[0];
    const int64_t N = e.B * e.T, E = c.num_experts, K = c.num_experts_per_tok, H = c.hidden_size;
    const bool mixtral = std::string(name) == "mixtral";
    const std::string moe = "model.layers.1." + std::string(mixtral ? "block_sparse_moe." : "mlp.");
    EXPECT_EQ(ro.router, moe + "gate");
    ASSERT_EQ(ro.rows, N);
    const auto& router_in = rec.find(moe + "gate");
    auto lg = ref_linear(router_in.x, N, H, m.weight(moe + "gate"), E);
    std::vector<int> count(E, 0);
    for (int64_t r = 0; r < N; ++r) {
      std::vector<double> p(E);
      double mx = -INFINITY, z = 0;
      for (int64_t x = 0; x < E; ++x) {
        ASSERT_NEAR(rec.route_logits[0][r * E + x], lg[r * E + x], 1e-5);
        mx = std::max(mx, lg[r * E + x]);
      }
      for (int64_t x = 0; x < E; ++x) z += (p[x] = std::exp(lg[r * E + x] - mx));
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
      double sel = 0;
      for (int64_t j = 0; j < K; ++j) sel += p[order[j]];
      for (int64_t j = 0; j < K; ++j) {
        EXPECT_EQ(rec.route_e[0][r * K + j], order[j]);
        const double want = (mixtral || c.norm_topk_prob) ? p[order[j]] / sel : p[order[j]] / z;
        EXPECT_NEAR(rec.route_w[0][r * K + j], want, 1e-5);
        ++count[order[j]];
      }
    }
    // each expert sees exactly the rows routed to it, with the router input's values
    for (int64_t x = 0; x < E; ++x) {
      if (count[x] == 0) continue;
      const std::string up = moe + "experts." + std::to_string(x) + (mixtral ? ".w3" : ".up_proj");
      const auto& ex = rec.find(up, x);
      ASSERT_EQ(ex.in.rows, count[x]);
      EXPECT_EQ(ex.in.modules.size(), 2u);
      for (int64_t i = 0; i < ex.in.rows; ++i) {
        const int64_t r = ex.rows[i];
        EXPECT_EQ(ex.real[i], router_in.real[r]);
        for (int64_t cc = 0; cc < H; ++cc) ASSERT_EQ(ex.x[i * H + cc], router_in.x[r * H + cc]);
        bool found = false;
        for (int64_t j = 0; j < K; ++j)
          if (rec.route_e[0][r * K + j] == x) {
            EXPECT_EQ(ex.rw[i], rec.route_w[0][r * K + j]);
            found = true;
          }
        EXPECT_TRUE(found);
      }
      const std::string down = moe + "experts." + std::to_string(x) + (mixtral ? ".w2" : ".down_proj");
      EXPECT_EQ(rec.find(down, x).in.rows, count[x]);
    }
  }
}

// ---- set_weight ------------------------------------------------------------------------------
TEST(EngineSetWeight, ChangesTheOutputLinearly) {
  Expected e = load_expected(fixture("qwen3_qknorm"));
  auto m = engine::Model::load(fixture("qwen3_qknorm"));
  const std::string mod = "model.layers.1.mlp.down_proj";
  const int64_t in = m.in_features(mod), out = m.out_features(mod);
  engine::Batch b{e.B, e.T, e.tokens, {}};
  auto h = m.embed(b);
  m.run_layer(0, h, nullptr);
  auto h1 = h;
  Recorder rec;
  m.run_layer(1, h1, &rec);
  const auto& x = rec.find(mod).x;
  std::vector<float> delta(in * out);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 0.05f);
  for (float& d : delta) d = nd(rng);
  auto w = m.weight(mod);
  for (size_t i = 0; i < w.size(); ++i) w[i] += delta[i];
  m.set_weight(mod, w);
  auto h2 = h;
  m.run_layer(1, h2, nullptr);
  auto dy = ref_linear(x, h.rows(), in, delta, out);
  double maxd = 0;
  for (size_t i = 0; i < h1.data.size(); ++i) {
    ASSERT_NEAR(h2.data[i] - h1.data[i], dy[i], 1e-4);
    maxd = std::max(maxd, std::abs(dy[i]));
  }
  EXPECT_GT(maxd, 1e-2);
  EXPECT_EQ(m.weight(mod), w);
  m.clear_weight(mod);
  auto h3 = h;
  m.run_layer(1, h3, nullptr);
  EXPECT_EQ(h3.data, h1.data);
  EXPECT_THROW(m.set_weight(mod, std::vector<float>(3)), Error);
  EXPECT_THROW(m.set_weight("model.layers.1.mlp.nope", w), Error);
}

TEST(EngineInputTransform, AppliedBeforeTheMatmul) {
  // A sign flip of the input with the weight's columns flipped too leaves the layer unchanged.
  Expected e = load_expected(fixture("llama_gqa"));
  auto m = engine::Model::load(fixture("llama_gqa"));
  engine::Batch b{e.B, e.T, e.tokens, {}};
  auto ref = m.forward(b);
  const std::string mod = "model.layers.0.self_attn.k_proj";
  const int64_t in = m.in_features(mod);
  std::vector<float> sign(in);
  for (int64_t i = 0; i < in; ++i) sign[i] = (i % 3 == 0) ? -1.0f : 1.0f;
  m.set_input_transform(mod, [&](float* x, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) x[r * cols + c] *= sign[c];
  });
  auto changed = m.forward(b);
  EXPECT_GT(max_rel_err(changed, ref, e.B, e.T, e.V, {}), 1e-3);
  auto w = m.weight(mod);
  for (size_t i = 0; i < w.size(); ++i) w[i] *= sign[i % in];
  m.set_weight(mod, w);
  Recorder rec;
  auto same = m.forward(b, &rec);
  EXPECT_LT(max_rel_err(same, ref, e.B, e.T, e.V, {}), 1e-5);
  // modules sharing the input are now observed separately; k_proj sees the transformed input
  EXPECT_EQ(rec.find(mod).in.modules, std::vector<std::string>{mod});
  EXPECT_EQ(rec.find("model.layers.0.self_attn.q_proj").in.modules.size(), 1u);
}

// ---- padding, errors ------------------------------------------------------------------------
TEST(EnginePadding, PaddingDoesNotAffectRealRows) {
  for (const char* name : {"qwen3_qknorm", "gpt2", "qwen3_moe_norm", "mistral_swa"}) {
    SCOPED_TRACE(name);
    Expected e = load_expected(fixture(name));
    auto m = engine::Model::load(fixture(name));
    const int64_t T = e.T, L = 7, V = m.config().vocab_size;
    std::vector<int32_t> toks = e.tokens;
    auto a = m.forward({2, T, toks, {T, L}});
    for (int64_t t = L; t < T; ++t) toks[T + t] = (toks[T + t] + 5) % static_cast<int32_t>(V);
    auto b = m.forward({2, T, toks, {T, L}});
    std::vector<int32_t> alone(e.tokens.begin() + T, e.tokens.begin() + T + L);
    auto c = m.forward({1, L, alone, {}});
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t j = 0; j < V; ++j) ASSERT_EQ(a[(T + t) * V + j], b[(T + t) * V + j]);
      EXPECT_LT(row_rel_err(a.data() + (T + t) * V, c.data() + t * V, V), 1e-5);
    }
  }
}

TEST(EngineErrors, NanReportsTheLayerAndLongContext) {
  Expected e = load_expected(fixture("llama_linear_rope"));
  auto m = engine::Model::load(fixture("llama_linear_rope"));
  auto w = m.weight("model.layers.1.self_attn.v_proj");
  w[5] = NAN;
  m.set_weight("model.layers.1.self_attn.v_proj", w);
  try {
    m.forward({e.B, e.T, e.tokens, {}});
    FAIL() << "no error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("layer 1"), std::string::npos) << err.what();
  }
  const int64_t too_long = m.config().max_position_embeddings + 1;
  std::vector<int32_t> toks(too_long, 1);
  EXPECT_THROW(m.embed({1, too_long, toks, {}}), Error);
  engine::Options o;
  o.allow_long_context = true;
  auto m2 = engine::Model::load(fixture("llama_linear_rope"), o);
  EXPECT_NO_THROW(m2.embed({1, too_long, toks, {}}));
  EXPECT_THROW(m2.embed({1, 2, {1, 500}, {}}), Error);    // token outside the vocabulary
  EXPECT_THROW(m2.embed({1, 2, {1, 2}, {0}}), Error);     // length 0
}

TEST(EngineOptions, CachedWeightsGiveTheSameLogits) {
  Expected e = load_expected(fixture("qwen3_moe_sparse"));
  engine::Options o;
  o.cache_weights = true;
  auto a = engine::Model::load(fixture("qwen3_moe_sparse"), o);
  auto b = engine::Model::load(fixture("qwen3_moe_sparse"));
  engine::Batch batch{e.B, e.T, e.tokens, e.lengths};
  auto la = a.forward(batch);
  EXPECT_EQ(a.forward(batch), la);  // second run from the cache
  EXPECT_EQ(b.forward(batch), la);
}

// Dense layers of a batch run sequence-parallel without an observer (each thread takes whole
// sequences through a layer) and batch-wide with one; with calq's own gemm kernels both give
// the same bits, cached (packed) weights or not.
TEST(EngineOptions, SequenceParallelEqualsTheBatchPath) {
  struct Nothing : engine::Observer {};
  const engine::GemmKernel before = engine::gemm_kernel();
  for (engine::GemmKernel k : {engine::GemmKernel::Blas, engine::GemmKernel::Avx2, engine::GemmKernel::Avx512}) {
    if (!engine::gemm_kernel_supported(k)) continue;
    engine::set_gemm_kernel(k);
    for (const char* name : {"qwen3_qknorm", "llama_mha_bias_tied", "mistral_swa"})
      for (bool cache : {false, true}) {
        Expected e = load_expected(fixture(name));
        ASSERT_GE(e.B, 2) << name;
        engine::Options o;
        o.cache_weights = cache;
        auto m = engine::Model::load(fixture(name), o);
        engine::Batch batch{e.B, e.T, e.tokens, e.lengths};
        Nothing obs;
        const auto split = m.forward(batch), whole = m.forward(batch, &obs);
        ASSERT_EQ(split.size(), whole.size());
        for (size_t i = 0; i < split.size(); ++i) {
          if (k == engine::GemmKernel::Blas)  // OpenBLAS splits its sums by thread count
            ASSERT_NEAR(split[i], whole[i], 1e-5f * (1 + std::fabs(whole[i]))) << name << " " << i;
          else
            ASSERT_EQ(split[i], whole[i]) << name << " kernel " << engine::gemm_kernel_name(k) << " cache " << cache
                                          << " at " << i;
        }
      }
  }
  engine::set_gemm_kernel(before);
}

TEST(EngineErrors, MissingTensorIsAnError) {
  calq_test::TempDir tmp;
  const path src = fixture("llama_gqa");
  calq_test::fs::copy_file(src / "config.json", tmp / "config.json");
  auto f = io::SafetensorsFile::open(src / "model.safetensors");
  const std::string dropped = "model.layers.1.mlp.up_proj.weight";
  {
    io::SafetensorsWriter w(tmp.path(), 1ull << 40, {});
    for (const auto& t : f->tensors())
      if (t.name != dropped) w.declare(t.name, t.dtype, t.shape);
    for (const auto& t : f->tensors())
      if (t.name != dropped) {
        auto v = f->view(t.name);
        w.write(t.name, v.data, v.nbytes);
      }
    w.finish();
  }
  try {
    engine::Model::load(tmp.path());
    FAIL() << "no error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find(dropped), std::string::npos) << err.what();
  }
}

// ---- calq quantized outputs -----------------------------------------------------------------
TEST(EngineQuantized, CalqOutputEqualsTheDequantizedWeights) {
  calq_test::TempDir tmp;
  pipeline::QuantizeOptions q;
  q.input = fixture("qwen3_moe_norm");
  q.output = tmp / "q";
  q.plan.format = quant::Format::parse("int4", 16);
  q.plan.group_size_explicit = true;
  q.plan.on_indivisible = pipeline::OnIndivisible::Keep;  // expert down_proj has 24 in-features
  pipeline::quantize_model(q);
  Expected e = load_expected(fixture("qwen3_moe_norm"));
  engine::Batch b{e.B, e.T, e.tokens, {}};
  auto mq = engine::Model::load(q.output);
  ASSERT_TRUE(mq.source().quantized());
  auto lq = mq.forward(b);
  // the same model from the HF checkpoint with every quantized weight replaced by its
  // dequantized values gives the same logits
  auto mf = engine::Model::load(fixture("qwen3_moe_norm"));
  auto lf = mf.forward(b);
  int replaced = 0;
  for (const auto& mod : mf.linear_modules())
    if (mq.source().entry(mod + ".weight").format) {
      mf.set_weight(mod, mq.weight(mod));
      ++replaced;
    }
  EXPECT_GT(replaced, 10);
  auto lr = mf.forward(b);
  EXPECT_LT(max_rel_err(lq, lr, e.B, e.T, e.V, {}), 1e-6);
  EXPECT_GT(max_rel_err(lq, lf, e.B, e.T, e.V, {}), 1e-4);  // quantization changed something
}

}  // namespace

// The engine's vectorisable exp against std::exp over the whole float range it serves.
TEST(EngineReference, FastExpMatchesStdExp) {
  double worst = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -87.0f + 175.0f * static_cast<float>(i) / 2000000.0f;
    const double want = std::exp(static_cast<double>(x));
    const double got = calq::engine::fast_exp(x);
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  EXPECT_LT(worst, 1e-6);
  EXPECT_EQ(calq::engine::fast_exp(0.0f), 1.0f);
  EXPECT_EQ(calq::engine::fast_exp(-100.0f), 0.0f);
  EXPECT_EQ(calq::engine::fast_exp(-INFINITY), 0.0f);
  EXPECT_TRUE(std::isinf(calq::engine::fast_exp(100.0f)));
  EXPECT_TRUE(std::isnan(calq::engine::fast_exp(NAN)));
  std::printf("[fast_exp] max relative error %.3g\n", worst);
}

// round_activations_bf16 (calibration's --activation-precision bf16 on the host, the GPU slots'
// rounding) against round-to-nearest-even on the bits: keep the upper 16 bits after adding
// 0x7FFF plus the lowest kept bit. Random values over many binades, then the adversarial ones:
// exact ties both ways, values one ulp off a tie, subnormals, signed zeros, the largest floats
// (which round to infinity) and infinities.
TEST(EngineActivations, RoundBf16IsNearestEven) {
  auto reference = [](float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    float y;
    std::memcpy(&y, &u, 4);
    return y;
  };
  auto from_bits = [](uint32_t u) {
    float y;
    std::memcpy(&y, &u, 4);
    return y;
  };
  engine::Activations h;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> mant(-1.f, 1.f);
  std::uniform_int_distribution<int> ex(-40, 40);
  for (int i = 0; i < 20000; ++i) h.data.push_back(std::ldexp(mant(rng), ex(rng)));
  for (uint32_t hi : {0x3F80u, 0x3F81u, 0xBF80u, 0x4049u, 0x0001u, 0x8000u, 0x7F7Fu, 0x0080u})
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) h.data.push_back(from_bits(hi << 16 | lo));
  h.data.push_back(std::numeric_limits<float>::infinity());
  h.data.push_back(-std::numeric_limits<float>::infinity());
  h.data.push_back(std::numeric_limits<float>::max());
  h.data.push_back(std::numeric_limits<float>::denorm_min());
  const auto before = h.data;
  engine::round_activations_bf16(h);
  int64_t changed = 0;
  for (size_t i = 0; i < before.size(); ++i) {
    const float want = reference(before[i]);
    ASSERT_EQ(std::memcmp(&h.data[i], &want, 4), 0) << std::hexfloat << before[i] << " -> " << h.data[i] << ", want " << want;
    changed += h.data[i] != before[i];
  }
  EXPECT_GT(changed, 19000);  // the comparison sees real rounding, not a copy
  // Ties go to the even neighbour: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
  engine::Activations t;
  t.data = {1.f + std::ldexp(1.f, -8), 1.f + 3 * std::ldexp(1.f, -8)};
  engine::round_activations_bf16(t);
  EXPECT_EQ(t.data[0], 1.f);
  EXPECT_EQ(t.data[1], 1.f + std::ldexp(1.f, -6));
}

// ---- LayerCache: the states a layer's true-sequential passes share ---------------------------
// A pipeline's passes over one layer, each after the previous step's modules got new weights (or
// an input transform): with a cache, every observed input and the final output are bit-identical
// to uncached runs, and the runs start where the changed modules allow (counted by `reused`).
TEST(EngineLayerCache, TrueSequentialPassesGiveTheUncachedBits) {
  struct StopAt : Recorder {
    std::string module;  // empty: run the whole layer
    bool done_after(const engine::LinearInput& in) const override {
      return !module.empty() && std::find(in.modules.begin(), in.modules.end(), module) != in.modules.end();
    }
  };
  struct Case {
    const char* fixture;
    std::array<int64_t, 3> reused;  // runs started at attn / mid / act
  };
  for (const Case& cs : {Case{"llama_gqa", {1, 1, 1}}, Case{"qwen3_qknorm", {1, 1, 1}}, Case{"mistral_swa", {1, 1, 1}},
                         Case{"llama_mha_bias_tied", {1, 1, 1}}, Case{"gpt2", {1, 1, 1}},
                         Case{"qwen3_moe_sparse", {1, 2, 0}}, Case{"mixtral", {1, 2, 0}}}) {
    SCOPED_TRACE(cs.fixture);
    Expected e = load_expected(fixture(cs.fixture));
    auto m = engine::Model::load(fixture(cs.fixture));
    const int64_t l = m.num_layers() - 1;
    auto h = m.embed({e.B, e.T, e.tokens, e.lengths});
    for (int64_t i = 0; i < l; ++i) m.run_layer(i, h, nullptr);
    // The steps: each dense input's modules, then all experts' modules as one step (as the
    // pipeline groups them).
    std::vector<std::vector<std::string>> steps;
    {
      Recorder probe;
      auto hp = h;
      m.run_layer(l, hp, &probe);
      std::vector<std::string> experts;
      for (const auto& r : probe.recs) {
        if (r.in.expert >= 0) {
          for (const auto& mod : r.in.modules)
            if (std::find(experts.begin(), experts.end(), mod) == experts.end()) experts.push_back(mod);
        } else {
          steps.push_back(r.in.modules);
        }
      }
      if (!experts.empty()) steps.push_back(experts);
    }
    ASSERT_GE(steps.size(), 4u);
    engine::LayerCache c;
    c.keep_attn = c.keep_mid = c.keep_act = true;
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0, 0.02f);
    for (size_t s = 0; s < steps.size(); ++s) {
      const bool expert_step = steps[s].front().find(".experts.") != std::string::npos;
      int max_start = 3;
      for (const auto& mod : steps[s]) max_start = std::min(max_start, m.layer_cache_stage(mod));
      StopAt cached, plain;
      cached.module = plain.module = expert_step ? "" : steps[s].back();
      c.max_start = max_start;
      auto hc = h, hr = h;
      m.run_layer(l, hc, &cached, &c);
      m.run_layer(l, hr, &plain);
      int seen = 0;
      for (const auto& r : plain.recs) {
        bool wanted = false;
        for (const auto& mod : r.in.modules)
          wanted = wanted || std::find(steps[s].begin(), steps[s].end(), mod) != steps[s].end();
        if (!wanted) continue;
        const auto& got = cached.find(r.in.modules.front(), r.in.expert);
        ASSERT_EQ(got.x, r.x) << "step " << s << " " << r.in.modules.front() << " expert " << r.in.expert;
        ++seen;
      }
      EXPECT_GT(seen, 0) << "step " << s;
      // The step's modules change: new weights, and for o_proj also an input transform (both
      // change what the layer computes after them).
      for (const auto& mod : steps[s]) {
        auto w = m.weight(mod);
        for (float& v : w) v += nd(rng);
        m.set_weight(mod, w);
        if (mod.find("o_proj") != std::string::npos || mod.find("attn.c_proj") != std::string::npos)
          m.set_input_transform(mod, [](float* x, int64_t rows, int64_t cols) {
            for (int64_t i = 0; i < rows * cols; ++i) x[i] *= 0.75f;
          });
      }
    }
    c.max_start = 3;
    auto hc = h, hr = h;
    m.run_layer(l, hc, nullptr, &c);
    m.run_layer(l, hr, nullptr);
    ASSERT_EQ(hc.data, hr.data);
    EXPECT_EQ(c.reused[0], cs.reused[0]);
    EXPECT_EQ(c.reused[1], cs.reused[1]);
    EXPECT_EQ(c.reused[2], cs.reused[2]);
    const auto widths = m.layer_cache_widths(l);
    EXPECT_EQ(c.attn.data.size(), static_cast<size_t>(h.rows() * widths[0]));
    EXPECT_EQ(c.mid.data.size(), static_cast<size_t>(h.rows() * widths[1]));
    EXPECT_EQ(c.act.data.size(), static_cast<size_t>(h.rows() * widths[2]));  // 0 on MoE layers

    // Every state is valid now: max_start bounds where a run starts, so an observer still sees
    // the inputs it asks for.
    for (int ms : {0, 1, 2, 3}) {
      Recorder a, b;
      c.max_start = ms;
      auto x = h, y = h;
      m.run_layer(l, x, &a, &c);
      m.run_layer(l, y, &b);
      ASSERT_EQ(x.data, y.data) << "max_start " << ms;
      ASSERT_FALSE(a.recs.empty());
      EXPECT_GE(m.layer_cache_stage(a.recs.front().in.modules.front()), ms == 3 && widths[2] == 0 ? 2 : ms);
      EXPECT_EQ(a.recs.back().x, b.recs.back().x);
      if (ms == 0) EXPECT_EQ(a.recs.size(), b.recs.size());
    }
    // A change upstream invalidates what follows it: an input transform alone (of gate/up on a
    // dense layer: the run starts at mid, not act), and clear_weight.
    if (widths[2] > 0) {
      const int64_t from_mid = c.reused[1], from_act = c.reused[2];
      m.set_input_transform(steps[2].front(), [](float* x, int64_t rows, int64_t cols) {
        for (int64_t i = 0; i < rows * cols; ++i) x[i] *= 0.5f;
      });
      c.max_start = 3;
      auto x = h, y = h;
      m.run_layer(l, x, nullptr, &c);
      m.run_layer(l, y, nullptr);
      EXPECT_EQ(x.data, y.data);
      EXPECT_EQ(c.reused[1], from_mid + 1);
      EXPECT_EQ(c.reused[2], from_act);
    }
    m.clear_weight(steps[0].front());
    {
      const int64_t before[3] = {c.reused[0], c.reused[1], c.reused[2]};
      c.max_start = 3;
      auto x = h, y = h;
      m.run_layer(l, x, nullptr, &c);
      m.run_layer(l, y, nullptr);
      EXPECT_EQ(x.data, y.data);
      for (int i = 0; i < 3; ++i) EXPECT_EQ(c.reused[i], before[i]) << "a stale state was used";
    }
    // A cache left by another layer (or another chunk shape) starts over.
    if (l > 0) {
      const int64_t before = c.reused[0] + c.reused[1] + c.reused[2];
      auto x = h, y = h;
      m.run_layer(l - 1, x, nullptr, &c);
      m.run_layer(l - 1, y, nullptr);
      EXPECT_EQ(x.data, y.data);
      EXPECT_EQ(c.layer, l - 1);
      EXPECT_EQ(c.reused[0] + c.reused[1] + c.reused[2], before) << "another layer's state was used";
    }
  }
}

TEST(EngineLayerCache, StagesOfModules) {
  auto m = engine::Model::load(fixture("qwen3_moe_sparse"));
  const auto& cfg = m.config();
  for (int64_t l = 0; l < m.num_layers(); ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    EXPECT_EQ(m.layer_cache_stage(p + "self_attn.q_proj"), 0);
    EXPECT_EQ(m.layer_cache_stage(p + "self_attn.v_proj"), 0);
    EXPECT_EQ(m.layer_cache_stage(p + "self_attn.o_proj"), 1);
    const bool sparse = cfg.layer_is_sparse(l);
    EXPECT_EQ(m.layer_cache_stage(p + "mlp.down_proj"), sparse ? 2 : 3) << l;
    EXPECT_EQ(m.layer_cache_stage(p + "mlp.gate_proj"), 2);
    EXPECT_EQ(m.layer_cache_stage(p + "mlp.experts.3.down_proj"), 2);
    EXPECT_EQ(m.layer_cache_stage(p + "mlp.gate"), 2);
    EXPECT_EQ(m.layer_cache_widths(l)[2], sparse ? 0 : cfg.intermediate_size);
  }
  EXPECT_EQ(m.layer_cache_stage("lm_head"), 0);
  EXPECT_EQ(m.layer_cache_stage("model.layers.99.self_attn.o_proj"), 0);
  auto g = engine::Model::load(fixture("gpt2"));
  EXPECT_EQ(g.layer_cache_stage("transformer.h.0.attn.c_attn"), 0);
  EXPECT_EQ(g.layer_cache_stage("transformer.h.0.attn.c_proj"), 1);
  EXPECT_EQ(g.layer_cache_stage("transformer.h.0.mlp.c_fc"), 2);
  EXPECT_EQ(g.layer_cache_stage("transformer.h.0.mlp.c_proj"), 3);
}

// router_exp (calq/engine/router.h, the MoE router's exp on the CPU and the GPU): the float that
// glibc's double exp rounds to, for every 997th float in [-110, 89] (about 2 million values) —
// at most one in a million may differ (by one ulp) where the exact value is within ~1e-15 of a
// rounding boundary; and the special values.
TEST(EngineReference, RouterExpIsTheRoundedExp) {
  int64_t n = 0, differ = 0;
  uint32_t lo_bits, hi_bits;
  const float lo = -110.0f, hi = 89.0f;
  std::memcpy(&lo_bits, &lo, 4);
  std::memcpy(&hi_bits, &hi, 4);
  auto check = [&](float x) {
    const float got = engine::router_exp(x), want = static_cast<float>(std::exp(static_cast<double>(x)));
    ++n;
    if (got == want) return;
    ++differ;
    EXPECT_EQ(std::abs(static_cast<int64_t>(std::bit_cast<int32_t>(got)) - std::bit_cast<int32_t>(want)), 1)
        << "x = " << x << ": " << got << " vs " << want;
  };
  for (uint32_t b = 0x80000000u; b <= lo_bits; b += 997) check(std::bit_cast<float>(b));  // [-110, -0]
  for (uint32_t b = 0; b <= hi_bits; b += 997) check(std::bit_cast<float>(b));            // [0, 89]
  std::printf("[router_exp] %lld of %lld differ from (float)exp((double)x)\n", static_cast<long long>(differ),
              static_cast<long long>(n));
  EXPECT_LE(differ, n / 1000000 + 1);
  EXPECT_EQ(engine::router_exp(0.0f), 1.0f);
  EXPECT_EQ(engine::router_exp(-0.0f), 1.0f);
  EXPECT_EQ(engine::router_exp(-INFINITY), 0.0f);
  EXPECT_EQ(engine::router_exp(-200.0f), 0.0f);
  EXPECT_TRUE(std::isinf(engine::router_exp(INFINITY)));
  EXPECT_TRUE(std::isinf(engine::router_exp(89.5f)));
  EXPECT_TRUE(std::isnan(engine::router_exp(NAN)));
  // Subnormal results round as the double value does.
  for (float x : {-87.5f, -95.0f, -100.0f, -103.5f, -103.9f})
    EXPECT_EQ(engine::router_exp(x), static_cast<float>(std::exp(static_cast<double>(x)))) << x;
}

// route_row against the plain statement of the routing: probabilities p_e = float(router_exp(l_e -
// max) / Σ) with the sum in fp64, the top K by a partial sort with (p decreasing, index increasing),
// weights p (or p / their fp32 sum with renorm); random logits with exact ties, -inf logits, E up
// to 128 and K up to E; a NaN row gives expert -1.
TEST(EngineReference, RouteRowIsTheTopKOfTheSoftmax) {
  std::mt19937 rng(23);
  std::normal_distribution<float> nd(0, 2);
  int cases = 0;
  for (int E : {1, 2, 3, 8, 64, 128})
    for (int K : {1, 2, 4, 8, 128}) {
      if (K > E) continue;
      for (bool renorm : {false, true})
        for (int it = 0; it < 20; ++it, ++cases) {
          std::vector<float> lg(static_cast<size_t>(E));
          for (auto& x : lg) x = nd(rng);
          if (it % 3 == 1)
            for (int e = 1; e < E; e += 3) lg[static_cast<size_t>(e)] = lg[static_cast<size_t>(e - 1)];  // ties
          if (it % 4 == 2 && E > 1) lg[static_cast<size_t>(E - 1)] = -INFINITY;
          std::vector<int32_t> sel(static_cast<size_t>(K));
          std::vector<float> wts(static_cast<size_t>(K));
          engine::route_row(lg.data(), E, K, renorm, sel.data(), wts.data());
          const float mx = *std::max_element(lg.begin(), lg.end());
          double sum = 0;
          for (float x : lg) sum += engine::router_exp(x - mx);
          std::vector<float> p(static_cast<size_t>(E));
          for (int e = 0; e < E; ++e)
            p[static_cast<size_t>(e)] = static_cast<float>(engine::router_exp(lg[static_cast<size_t>(e)] - mx) / sum);
          std::vector<int32_t> idx(static_cast<size_t>(E));
          std::iota(idx.begin(), idx.end(), 0);
          std::partial_sort(idx.begin(), idx.begin() + K, idx.end(), [&](int32_t a, int32_t b) {
            return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)] ||
                   (p[static_cast<size_t>(a)] == p[static_cast<size_t>(b)] && a < b);
          });
          float s = 0;
          for (int j = 0; j < K; ++j) s += p[static_cast<size_t>(idx[static_cast<size_t>(j)])];
          for (int j = 0; j < K; ++j) {
            const float pj = p[static_cast<size_t>(idx[static_cast<size_t>(j)])];
            ASSERT_EQ(sel[static_cast<size_t>(j)], idx[static_cast<size_t>(j)]) << "E " << E << " K " << K << " pick " << j;
            ASSERT_EQ(wts[static_cast<size_t>(j)], renorm ? pj / s : pj) << "E " << E << " K " << K << " pick " << j;
          }
        }
    }
  EXPECT_GT(cases, 500);
  std::vector<float> bad = {0.5f, NAN, 1.0f};
  std::vector<int32_t> sel(2);
  std::vector<float> wts(2);
  engine::route_row(bad.data(), 3, 2, true, sel.data(), wts.data());
  EXPECT_EQ(sel[1], -1);
}
