// Rotated checkpoints (docs/format.md "Rotations"): a model whose linear weights are stored as
// W·R in fp32 with their rotations recorded must give the original model's logits (the engine
// rotates the inputs), the rotation metadata must round-trip, and damaged rotation metadata must
// fail at load time.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/export/native.h"
#include "calq/io/atomic.h"
#include "calq/io/config.h"
#include "calq/io/safetensors.h"
#include "calq/model/synth.h"
#include "calq/quant/hadamard.h"
#include "support.h"

using namespace calq;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A small llama with a non-power-of-two intermediate size (48 = 12·4: full Paley rotation).
fs::path make_base(const fs::path& dir) {
  json c = {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"hidden_act", "silu"},
            {"hidden_size", 64},
            {"intermediate_size", 48},
            {"head_dim", 16},
            {"num_attention_heads", 4},
            {"num_key_value_heads", 2},
            {"num_hidden_layers", 2},
            {"max_position_embeddings", 128},
            {"rms_norm_eps", 1e-6},
            {"rope_theta", 10000.0},
            {"tie_word_embeddings", false},
            {"vocab_size", 96}};
  model::SynthOptions o;
  o.dtype = DType::F32;
  o.seed = 5;
  o.std = 0.08f;
  o.outlier_rate = 0.05f;
  model::write_random_model(io::parse_config(c), dir, o);
  return dir;
}

struct RotSpec {
  int64_t block;  // 0: full
  uint64_t seed;
};

enum class Damage { None, MissingSigns, ShortSigns, NoMetadata, BadSign };

// Copies `base` to `out` with every module of `rots` stored as W·R and its rotation recorded.
void write_rotated(const fs::path& base, const fs::path& out, const std::map<std::string, RotSpec>& rots,
                   Damage damage = Damage::None) {
  auto src = native::Model::open(base);
  fs::create_directories(out);
  json rj = json::object();
  std::map<std::string, std::vector<float>> data;
  std::map<std::string, Shape> shapes;
  for (const auto& e : src.entries()) {
    data[e.name] = src.load_f32(e.name);
    shapes[e.name] = e.shape;
  }
  bool first = true;
  for (const auto& [mod, s] : rots) {
    auto& w = data.at(mod + ".weight");
    const int64_t in = shapes[mod + ".weight"][1];
    auto r = quant::Rotation::make(in, s.block, s.seed);
    r.apply_rows(w.data(), static_cast<int64_t>(w.size()) / in);
    std::vector<float> signs = r.signs;
    if (first && damage == Damage::ShortSigns) signs.pop_back();
    if (first && damage == Damage::BadSign) signs[3] = 0.5f;
    if (!(first && damage == Damage::MissingSigns)) {
      data[native::rotation_signs_name(mod)] = signs;
      shapes[native::rotation_signs_name(mod)] = {static_cast<int64_t>(signs.size())};
    }
    if (!(first && damage == Damage::NoMetadata)) rj[mod] = native::rotation_json(r, mod);
    first = false;
  }
  {
    io::SafetensorsWriter wr(out, 1ull << 40, {{"format", "pt"}});
    for (const auto& [n, v] : data) wr.declare(n, DType::F32, shapes[n]);
    for (const auto& [n, v] : data) wr.write(n, v.data(), v.size() * sizeof(float));
    wr.finish();
  }
  json cfg = src.config().raw;
  cfg["quantization_config"] = {{"quant_method", "calq"},
                                {"config_groups", json::object()},
                                {"ignore", json::array()},
                                {"calq", {{"rotations", rj}}}};
  calq_test::write_file(out / "config.json", cfg.dump(1));
}

double max_row_rel_err(const std::vector<float>& a, const std::vector<float>& b, int64_t V) {
  double worst = 0;
  for (size_t r = 0; r < a.size() / V; ++r) {
    double num = 0, den = 0;
    for (int64_t j = 0; j < V; ++j) {
      num = std::max(num, std::fabs(static_cast<double>(a[r * V + j]) - b[r * V + j]));
      den = std::max(den, std::fabs(static_cast<double>(b[r * V + j])));
    }
    worst = std::max(worst, num / den);
  }
  return worst;
}

std::map<std::string, RotSpec> all_rotations() {
  std::map<std::string, RotSpec> r;
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}) r[p + m] = {16, 7};
    r[p + "self_attn.o_proj"] = {0, 3};  // full width 64: one Walsh–Hadamard transform
    r[p + "mlp.gate_proj"] = {32, 1};
    r[p + "mlp.up_proj"] = {32, 2};      // fused modules may even use different rotations
    r[p + "mlp.down_proj"] = {0, 9};     // full width 48 = 12·4 (Paley ⊗ Sylvester)
  }
  return r;
}

}  // namespace

TEST(RotatedModel, RotatedOnlyModelGivesTheOriginalLogits) {
  calq_test::TempDir t;
  const fs::path base = make_base(t / "base");
  write_rotated(base, t / "rot", all_rotations());
  auto bm = engine::Model::load(base);
  auto rm = engine::Model::load(t / "rot");
  const int64_t B = 2, T = 9, V = 96;
  std::vector<int32_t> toks;
  for (int64_t i = 0; i < B * T; ++i) toks.push_back(static_cast<int32_t>((i * 37 + 11) % V));
  engine::Batch b{B, T, toks, {}};
  auto ref = bm.forward(b);
  auto got = rm.forward(b);
  EXPECT_LT(max_row_rel_err(got, ref, V), 1e-5);
  // The stored weights really are rotated: without the input rotation the layer would differ.
  auto wr = rm.weight("model.layers.0.mlp.down_proj"), w0 = bm.weight("model.layers.0.mlp.down_proj");
  double diff = 0;
  for (size_t i = 0; i < w0.size(); ++i) diff = std::max(diff, std::fabs(static_cast<double>(wr[i]) - w0[i]));
  EXPECT_GT(diff, 1e-2);
}

TEST(RotatedModel, MetadataRoundTripAndUnrotatedWeights) {
  calq_test::TempDir t;
  const fs::path base = make_base(t / "base");
  write_rotated(base, t / "rot", all_rotations());
  auto src = native::Model::open(base);
  auto m = native::Model::open(t / "rot");
  ASSERT_EQ(m.rotations().size(), all_rotations().size());
  for (const auto& [mod, s] : all_rotations()) {
    const auto* r = m.rotation(mod);
    ASSERT_NE(r, nullptr) << mod;
    const int64_t in = src.entry(mod + ".weight").shape[1];
    EXPECT_EQ(r->dim, in);
    EXPECT_EQ(r->block, s.block == 0 ? in : s.block);
    EXPECT_EQ(r->seed, s.seed);
    EXPECT_EQ(r->signs, quant::rotation_signs(in, s.seed));
    EXPECT_EQ(r->full.empty(), (in & (in - 1)) == 0) << mod;
    // Ŵ = (W·R)·Rᵀ = W.
    auto w = m.load_f32_unrotated(mod + ".weight"), w0 = src.load_f32(mod + ".weight");
    for (size_t i = 0; i < w0.size(); ++i) ASSERT_NEAR(w[i], w0[i], 1e-5) << mod << " " << i;
  }
  // Sign vectors are not model tensors.
  EXPECT_FALSE(m.contains(native::rotation_signs_name("model.layers.0.mlp.down_proj")));
  EXPECT_EQ(m.rotation("model.layers.0.input_layernorm"), nullptr);
}

TEST(RotatedModel, DamagedRotationsFailToLoad) {
  calq_test::TempDir t;
  const fs::path base = make_base(t / "base");
  struct C {
    Damage d;
    const char* needle;
  };
  for (const C& c : {C{Damage::MissingSigns, "is missing"}, C{Damage::ShortSigns, "expected F32 [48]"},
                     C{Damage::NoMetadata, "does not record"}, C{Damage::BadSign, "expected ±1"}}) {
    const fs::path out = t / ("d" + std::to_string(static_cast<int>(c.d)));
    write_rotated(base, out, all_rotations(), c.d);
    try {
      engine::Model::load(out);
      ADD_FAILURE() << "loaded damaged model " << static_cast<int>(c.d);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos) << e.what();
    }
  }
}
