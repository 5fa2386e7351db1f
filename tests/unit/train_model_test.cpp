// The training model: fp32 forward against the engine on the parity fixtures, whole-model
// gradients against central finite differences, LoRA parameter counts, gradient accumulation,
// AdamW / cosine LR / clipping against hand computations, bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/io/config.h"
#include "calq/model/layout.h"
#include "calq/train/model.h"
#include "calq/train/optim.h"
#include "calq/train/trainer.h"
#include "support.h"

using namespace calq;
using namespace calq::train;

namespace {

std::map<std::string, std::vector<float>> random_tensors(const io::ModelConfig& c, uint64_t seed, float scale) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::map<std::string, std::vector<float>> t;
  for (const auto& e : model::expected_tensors(c)) {
    std::vector<float> v(static_cast<size_t>(shape_numel(e.shape)));
    for (auto& x : v) x = e.is_norm ? 1.0f + 0.2f * d(g) : scale * d(g);
    t[e.name] = std::move(v);
  }
  return t;
}

io::ModelConfig tiny(const std::string& type) {
  nlohmann::json j;
  if (type == "gpt2")
    j = {{"model_type", "gpt2"}, {"n_embd", 16}, {"n_head", 2}, {"n_layer", 2}, {"n_positions", 32},
         {"vocab_size", 23}, {"tie_word_embeddings", true}};
  else
    j = {{"model_type", "qwen3"}, {"hidden_size", 16}, {"intermediate_size", 24}, {"num_hidden_layers", 2},
         {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 8}, {"vocab_size", 23},
         {"max_position_embeddings", 32}, {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-6}};
  return io::parse_config(j, "tiny-" + type);
}

std::vector<int32_t> random_tokens(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(g() % static_cast<uint64_t>(V));
  return t;
}

void randomize_lora(Model& m, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 0.3f);
  for (auto& L : m.linears())
    if (L.lora)
      for (auto& x : L.lora->B.value) x = d(g);
}

}  // namespace

TEST(TrainModel, ForwardMatchesEngineOnParityFixtures) {
  for (const char* name : {"gpt2", "qwen3_qknorm", "llama_gqa", "qwen3_mha", "qwen2_bias", "llama3_rope",
                           "llama_mha_bias_tied"}) {
    SCOPED_TRACE(name);
    const auto dir = calq_test::source_dir() / "tests/data/engine" / name;
    ModelOptions o;
    o.lora.rank = 4;  // B = 0: the adapters change nothing
    o.lora.head = true;
    auto m = Model::load(dir, o);
    auto e = engine::Model::load(dir);
    const int64_t B = 2, T = 10;
    const auto tok = random_tokens(B * T, m.config().vocab_size, 7);
    engine::Batch b;
    b.batch = B;
    b.seq = T;
    b.tokens = tok;
    const auto ref = e.forward(b);
    const auto got = m.logits(tok, B, T);
    ASSERT_EQ(ref.size(), got.size());
    double mx = 0, err = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      mx = std::max(mx, static_cast<double>(std::fabs(ref[i])));
      err = std::max(err, static_cast<double>(std::fabs(ref[i] - got[i])));
    }
    EXPECT_LT(err, 1e-5 * std::max(1.0, mx)) << "max |logit| " << mx;
    std::printf("%s: max |logit diff| %.2e, max |logit| %.2f\n", name, err, mx);
  }
}

// Central differences of the mean loss over every LoRA factor and trainable norm parameter (a
// subset of elements per tensor to bound the time).
void check_model_grads(const std::string& type, bool head, double dropout = 0.0) {
  const auto cfg = tiny(type);
  ModelOptions o;
  o.lora.rank = 3;
  o.lora.alpha = 6;
  o.lora.head = head;
  o.lora.dropout = dropout;
  o.train_norms = true;
  auto m = Model::from_tensors(cfg, random_tensors(cfg, 3, 0.3f), o);
  randomize_lora(m, 4);
  if (dropout > 0) {  // the same masks in every evaluation (fixed step seed)
    m.set_training(true);
    m.set_step_seed(5);
  }
  const int64_t B = 2, T = 7;
  const auto tok = random_tokens(B * T, cfg.vocab_size, 5);
  m.zero_grad();
  m.loss(tok, B, T, true);
  int checked = 0;
  double num = 0, den = 0;
  for (Param* p : m.params()) {
    const auto g = p->grad;
    const size_t stride = std::max<size_t>(1, p->value.size() / 12);
    for (size_t i = 0; i < p->value.size(); i += stride) {
      const float x0 = p->value[i], h = 1e-2f;
      p->value[i] = x0 + h;
      const double lp = m.loss(tok, B, T, false);
      p->value[i] = x0 - h;
      const double lm = m.loss(tok, B, T, false);
      p->value[i] = x0;
      const double fd = (lp - lm) / (static_cast<double>(x0 + h) - (x0 - h));
      num += (fd - g[i]) * (fd - g[i]);
      den += fd * fd;
      ++checked;
      EXPECT_NEAR(g[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << p->name << "[" << i << "]";
    }
  }
  EXPECT_GT(checked, 100);
  EXPECT_LT(std::sqrt(num / den), 5e-3);
}

TEST(TrainModel, Gpt2GradientsMatchFiniteDifferences) { check_model_grads("gpt2", true); }
TEST(TrainModel, Qwen3GradientsMatchFiniteDifferences) { check_model_grads("qwen3", false); }
TEST(TrainModel, LoraDropoutGradientsMatchFiniteDifferences) { check_model_grads("gpt2", true, 0.3); }

TEST(TrainModel, LoraDropoutOnlyWhenTraining) {
  const auto cfg = tiny("qwen3");
  ModelOptions o;
  o.lora.rank = 2;
  o.lora.dropout = 0.5;
  auto m = Model::from_tensors(cfg, random_tensors(cfg, 3, 0.3f), o);
  randomize_lora(m, 4);
  const auto tok = random_tokens(8, cfg.vocab_size, 1);
  const double eval1 = m.loss(tok, 1, 8, false);
  m.set_training(true);
  m.set_step_seed(1);
  const double t1 = m.loss(tok, 1, 8, false);
  m.set_step_seed(2);
  const double t2 = m.loss(tok, 1, 8, false);
  m.set_training(false);
  EXPECT_EQ(m.loss(tok, 1, 8, false), eval1);
  EXPECT_NE(t1, eval1);
  EXPECT_NE(t1, t2);
}

TEST(TrainModel, LoraParameterCountGpt2Small) {
  // GPT-2 small (124M), rank 16 on every linear including the head: 3,175,696 LoRA parameters.
  const auto cfg = io::parse_config({{"model_type", "gpt2"}, {"n_embd", 768}, {"n_head", 12}, {"n_layer", 12},
                                     {"n_positions", 1024}, {"vocab_size", 50257}},
                                    "gpt2-small");
  std::map<std::string, std::vector<float>> t;
  for (const auto& e : model::expected_tensors(cfg)) t[e.name].resize(static_cast<size_t>(shape_numel(e.shape)));
  ModelOptions o;
  o.lora.rank = 16;
  o.lora.alpha = 32;
  o.lora.head = true;
  o.train_norms = true;
  auto m = Model::from_tensors(cfg, std::move(t), o);
  EXPECT_EQ(m.num_lora_params(), 3175696);
  EXPECT_EQ(m.num_trainable_params(), 3175696 + 38400);  // + 25 LayerNorms x (768 + 768)
  EXPECT_EQ(m.num_frozen_params(), 124439808 - 38400);   // GPT-2 small, head tied to wte
  int adapters = 0;
  for (const auto& L : m.linears()) adapters += L.lora != nullptr;
  EXPECT_EQ(adapters, 49);
}

TEST(TrainModel, LoraTargetsByRegex) {
  const auto cfg = tiny("qwen3");
  ModelOptions o;
  o.lora.rank = 2;
  o.lora.targets = "q_proj|v_proj";
  auto m = Model::from_tensors(cfg, random_tensors(cfg, 1, 0.1f), o);
  std::vector<std::string> adapted;
  for (const auto& L : m.linears())
    if (L.lora) adapted.push_back(L.name);
  EXPECT_EQ(adapted, (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                               "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}));
  o.lora.targets = "c_attn";  // a gpt2 name on a qwen3 model
  try {
    Model::from_tensors(cfg, random_tensors(cfg, 1, 0.1f), o);
    FAIL() << "a regex matching nothing must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("matches no linear module"), std::string::npos) << e.what();
  }
  o.lora.targets = "q_proj(";
  EXPECT_THROW(Model::from_tensors(cfg, random_tensors(cfg, 1, 0.1f), o), Error);
}

TEST(TrainModel, GradientAccumulationEqualsFullBatch) {
  const auto cfg = tiny("gpt2");
  ModelOptions o;
  o.lora.rank = 2;
  auto m = Model::from_tensors(cfg, random_tensors(cfg, 9, 0.3f), o);
  randomize_lora(m, 10);
  const int64_t T = 8;
  const auto tok = random_tokens(4 * T, cfg.vocab_size, 11);
  m.zero_grad();
  const double full = m.loss(tok, 4, T, true);
  std::vector<std::vector<float>> g1;
  for (Param* p : m.params()) g1.push_back(p->grad);
  m.zero_grad();
  const std::vector<int32_t> a(tok.begin(), tok.begin() + 2 * T), b(tok.begin() + 2 * T, tok.end());
  const double la = m.loss(a, 2, T, true, 0.5f), lb = m.loss(b, 2, T, true, 0.5f);
  EXPECT_NEAR(full, 0.5 * (la + lb), 1e-5);
  size_t k = 0;
  for (Param* p : m.params()) {
    for (size_t i = 0; i < p->grad.size(); ++i) EXPECT_NEAR(p->grad[i], g1[k][i], 1e-5 + 1e-4 * std::fabs(g1[k][i]));
    ++k;
  }
}

TEST(TrainOptim, AdamWMatchesHandComputation) {
  Param p, q;
  p.value = {1.0f, -2.0f};
  p.grad = {0.5f, -0.25f};
  p.decay = true;
  q.value = {3.0f};
  q.grad = {1.0f};
  q.decay = false;
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.1;
  AdamW opt({&p, &q}, o);
  opt.step(0.1);
  // Step 1: m = 0.1 g, v = 0.001 g^2, bias-corrected m/v give g/|g|: update = lr * sign(g).
  EXPECT_NEAR(p.value[0], 1.0 * (1 - 0.01) - 0.1 * 0.5 / (0.5 + 1e-8), 1e-6);
  EXPECT_NEAR(p.value[1], -2.0 * (1 - 0.01) + 0.1, 1e-6);
  EXPECT_NEAR(q.value[0], 3.0 - 0.1, 1e-6);  // no decay
  p.grad = {0.5f, 0.25f};
  q.grad = {-1.0f};
  opt.step(0.05);
  // Step 2 by hand for q: m = 0.9*0.1 - 0.1 = -0.01, v = 0.999*0.001 + 0.001 = 0.001999.
  const double mh = -0.01 / (1 - 0.81), vh = 0.001999 / (1 - 0.998001);
  EXPECT_NEAR(q.value[0], 2.9 - 0.05 * mh / (std::sqrt(vh) + 1e-8), 1e-6);
}

TEST(TrainOptim, CosineWarmupAndClipping) {
  // 10 steps, 2 warm-up: 0.5, 1.0 of lr, then cosine from lr to min over the remaining 8.
  EXPECT_DOUBLE_EQ(cosine_lr(0, 10, 2, 1.0, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(cosine_lr(1, 10, 2, 1.0, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(cosine_lr(2, 10, 2, 1.0, 0.1), 1.0);
  EXPECT_NEAR(cosine_lr(9, 10, 2, 1.0, 0.1), 0.1, 1e-12);
  EXPECT_NEAR(cosine_lr(5, 10, 2, 1.0, 0.0), 0.5 * (1 + std::cos(M_PI * 3.0 / 7.0)), 1e-12);
  Param p;
  p.value = {0, 0};
  p.grad = {3.0f, 4.0f};
  EXPECT_DOUBLE_EQ(clip_grad_norm({&p}, 1.0), 5.0);
  EXPECT_NEAR(p.grad[0], 0.6f, 1e-6);
  EXPECT_NEAR(p.grad[1], 0.8f, 1e-6);
  p.grad = {0.3f, 0.4f};
  clip_grad_norm({&p}, 1.0);
  EXPECT_FLOAT_EQ(p.grad[0], 0.3f);
}

namespace {
std::vector<double> raw_f64(const calq_test::RawTensor& t) {
  std::vector<double> v(t.bytes.size() / 8);
  std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
  return v;
}
}  // namespace

// Loss and LoRA gradients against PyTorch autograd (float64 reference; fixtures made by
// scripts/fixtures/make_cpt_fixtures.py): within 1e-4 relative.
TEST(TrainModel, MatchesTorchAutograd) {
  for (const char* name : {"gpt2", "qwen3"}) {
    SCOPED_TRACE(name);
    const auto dir = calq_test::source_dir() / "tests/data/cpt" / name;
    const auto meta = nlohmann::json::parse(calq_test::read_file(dir / "lora.json"));
    auto exp = calq_test::read_safetensors(dir / "expected.safetensors");
    ModelOptions o;
    o.lora.rank = meta["rank"];
    o.lora.alpha = meta["alpha"];
    o.lora.targets = meta["targets"];
    o.lora.head = meta["head"];
    auto m = Model::load(dir, o);
    int adapters = 0;
    for (auto& L : m.linears()) {
      if (!L.lora) continue;
      ++adapters;
      ASSERT_TRUE(exp.count(L.name + ".lora_A.weight")) << L.name << " adapted here but not in the fixture";
      L.lora->A.value = calq_test::raw_to_float(exp.at(L.name + ".lora_A.weight"));
      L.lora->B.value = calq_test::raw_to_float(exp.at(L.name + ".lora_B.weight"));
    }
    EXPECT_EQ(adapters * 4 + 2, static_cast<int>(exp.size()));
    const auto& tt = exp.at("tokens");
    std::vector<int32_t> tok(tt.bytes.size() / 4);
    std::memcpy(tok.data(), tt.bytes.data(), tt.bytes.size());
    m.zero_grad();
    const double loss = m.loss(tok, tt.shape[0], tt.shape[1], true);
    const double ref = raw_f64(exp.at("loss"))[0];
    EXPECT_NEAR(loss, ref, 1e-4 * std::fabs(ref));
    double worst = 0;
    for (auto& L : m.linears()) {
      if (!L.lora) continue;
      for (const char* f : {"A", "B"}) {
        const Param& p = f[0] == 'A' ? L.lora->A : L.lora->B;
        const auto g = raw_f64(exp.at(L.name + ".lora_" + f + ".grad"));
        ASSERT_EQ(g.size(), p.grad.size());
        double mx = 0, err = 0;
        for (size_t i = 0; i < g.size(); ++i) {
          mx = std::max(mx, std::fabs(g[i]));
          err = std::max(err, std::fabs(g[i] - p.grad[i]));
        }
        EXPECT_GT(mx, 0.0) << p.name;
        EXPECT_LE(err, 1e-4 * mx) << p.name << " max |grad| " << mx;
        worst = std::max(worst, err / mx);
      }
    }
    std::printf("%s: loss %.8f (torch %.8f, rel. diff %.2e); worst LoRA gradient error %.2e of the tensor's max\n",
                name, loss, ref, std::fabs(loss - ref) / std::fabs(ref), worst);
  }
}

// The merged model (W + scale·B·A written in the base layout and dtype) run by the engine gives
// the logits of the training model with its adapters.
TEST(TrainModel, MergedModelMatchesAdapters) {
  for (const char* name : {"gpt2", "qwen3"}) {
    SCOPED_TRACE(name);
    const auto dir = calq_test::source_dir() / "tests/data/cpt" / name;
    ModelOptions o;
    o.lora.rank = 3;
    o.lora.alpha = 5;
    auto m = Model::load(dir, o);
    randomize_lora(m, 21);
    calq_test::TempDir t;
    write_merged_model(m, dir, t / "merged", false);
    auto e = engine::Model::load(t / "merged");
    const int64_t B = 2, T = 9;
    const auto tok = random_tokens(B * T, m.config().vocab_size, 22);
    engine::Batch b;
    b.batch = B;
    b.seq = T;
    b.tokens = tok;
    const auto ref = m.logits(tok, B, T);
    const auto got = e.forward(b);
    double mx = 0, err = 0, moved = 0;
    auto base = Model::load(dir, ModelOptions{}).logits(tok, B, T);
    for (size_t i = 0; i < ref.size(); ++i) {
      mx = std::max(mx, static_cast<double>(std::fabs(ref[i])));
      err = std::max(err, static_cast<double>(std::fabs(ref[i] - got[i])));
      moved = std::max(moved, static_cast<double>(std::fabs(ref[i] - base[i])));
    }
    EXPECT_GT(moved, 1e-2 * mx);  // the adapters matter
    EXPECT_LT(err, 1e-5 * std::max(1.0, mx));
  }
  // A LoRA on a head tied to the embedding cannot be merged.
  ModelOptions o;
  o.lora.rank = 2;
  o.lora.head = true;
  auto m = Model::load(calq_test::source_dir() / "tests/data/cpt/gpt2", o);
  calq_test::TempDir t;
  EXPECT_THROW(write_merged_model(m, calq_test::source_dir() / "tests/data/cpt/gpt2", t / "m", false), Error);
}
