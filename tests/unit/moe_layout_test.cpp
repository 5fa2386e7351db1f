// Mixture-of-experts checkpoints: fused 3-D expert banks (transformers 5) read as per-expert
// tensors, byte for byte and logit for logit, and damaged expert tensors refused with errors that
// name the layer and the tensor.
#include <gtest/gtest.h>

#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/io/moe_layout.h"
#include "calq/io/safetensors.h"
#include "moe_checkpoint.h"
#include "support.h"

using namespace calq;
using calq_test::TempDir;
using calq_test::Tensors;
namespace fs = std::filesystem;

namespace {

fs::path fixture(const std::string& name) { return calq_test::source_dir() / "tests/data/engine" / name; }

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "wanted '" << (needle) << "' in: " << (haystack)

// The error Checkpoint::open gives for a model directory ("" when it opens).
std::string open_error(const fs::path& dir) {
  try {
    io::Checkpoint::open(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::vector<float> logits(const fs::path& dir) {
  auto m = engine::Model::load(dir);
  engine::Batch b;
  b.batch = 2;
  b.seq = 7;
  for (int i = 0; i < 14; ++i) b.tokens.push_back((i * 37 + 5) % 128);
  return m.forward(b);
}

struct Layout {
  const char* fixture;
  calq_test::FuseOptions fuse;
};

// The fused checkpoint shows exactly the per-expert checkpoint's tensors (names, dtypes, shapes,
// bytes), none of the bank names, and the engine's logits are bit-identical.
TEST(MoeLayout, FusedBanksReadAsPerExpertTensors) {
  for (const Layout& l : {Layout{"qwen3_moe_sparse", {"", false}}, Layout{"qwen3_moe_sparse", {".weight", false}},
                          Layout{"mixtral", {"", true}}, Layout{"mixtral", {".weight", false}}}) {
    SCOPED_TRACE(std::string(l.fixture) + " suffix '" + l.fuse.suffix + "'" + (l.fuse.mixtral_mlp ? " mlp." : ""));
    TempDir t;
    const fs::path src = fixture(l.fixture);
    const auto cfg = io::load_config(src);
    const Tensors fused = calq_test::fuse_experts(calq_test::read_stored(src), cfg, l.fuse);
    size_t banks = 0;
    for (const auto& [n, x] : fused) banks += io::is_fused_expert_bank(n) ? 1 : 0;
    ASSERT_EQ(banks, 2u * 2u) << "two sparse layers, two banks each";
    calq_test::write_model(t / "fused", fused, src);

    auto per = io::Checkpoint::open(src);
    auto fu = io::Checkpoint::open(t / "fused");
    ASSERT_EQ(fu.names(), per.names());
    EXPECT_EQ(fu.total_bytes(), per.total_bytes());
    for (const auto& n : per.names()) {
      SCOPED_TRACE(n);
      const auto a = per.view(n), b = fu.view(n);
      ASSERT_EQ(b.dtype, a.dtype);
      ASSERT_EQ(b.shape, a.shape);
      ASSERT_EQ(b.nbytes, a.nbytes);
      EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes), 0);
      // Offsets stay within the file that holds the tensor, and the view is the mmapped bytes.
      const auto& fi = fu.info(n);
      EXPECT_EQ(fi.end - fi.begin, a.nbytes);
      EXPECT_EQ(fu.file_of(n).path(), t / "fused" / "model.safetensors");
      fu.release(n);
    }
    for (const auto& [n, x] : fused)
      if (io::is_fused_expert_bank(n)) EXPECT_FALSE(fu.contains(n)) << n;

    const auto want = logits(src), got = logits(t / "fused");
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0) << "logits differ";
  }
}

// The split really takes gate rows before up rows: a bank with the two halves swapped reads as
// different tensors (so the test above can fail).
TEST(MoeLayout, GateRowsComeFirst) {
  TempDir t;
  const fs::path src = fixture("qwen3_moe_sparse");
  const auto cfg = io::load_config(src);
  Tensors fused = calq_test::fuse_experts(calq_test::read_stored(src), cfg);
  auto& gu = fused.at("model.layers.1.mlp.experts.gate_up_proj");
  const size_t half = gu.bytes.size() / static_cast<size_t>(2 * cfg.num_experts);
  std::vector<std::byte> tmp(half);
  std::memcpy(tmp.data(), gu.bytes.data(), half);  // expert 0: swap gate and up
  std::memcpy(gu.bytes.data(), gu.bytes.data() + half, half);
  std::memcpy(gu.bytes.data() + half, tmp.data(), half);
  calq_test::write_model(t / "swapped", fused, src);
  auto per = io::Checkpoint::open(src);
  auto sw = io::Checkpoint::open(t / "swapped");
  const std::string g = "model.layers.1.mlp.experts.0.gate_proj.weight", u = "model.layers.1.mlp.experts.0.up_proj.weight";
  EXPECT_EQ(std::memcmp(sw.view(g).data, per.view(u).data, half), 0);
  EXPECT_EQ(std::memcmp(sw.view(u).data, per.view(g).data, half), 0);
  EXPECT_NE(std::memcmp(sw.view(g).data, per.view(g).data, half), 0);
  const std::string g1 = "model.layers.1.mlp.experts.1.gate_proj.weight";
  EXPECT_EQ(std::memcmp(sw.view(g1).data, per.view(g1).data, half), 0);
}

// Each damaged checkpoint is refused when opened (every command opens it before doing anything),
// with a message naming the layer and the tensor.
TEST(MoeLayout, BadInputNamesLayerAndTensor) {
  const fs::path q = fixture("qwen3_moe_sparse"), x = fixture("mixtral");
  const auto qc = io::load_config(q), xc = io::load_config(x);
  const Tensors qt = calq_test::read_stored(q), xt = calq_test::read_stored(x);
  const std::string L1 = "model.layers.1.mlp.";
  struct Case {
    std::string what;
    Tensors tensors;
    fs::path config;
    std::vector<std::string> want;
  };
  std::vector<Case> cases;
  {  // an expert index the config does not have (num_experts 4: experts 0..3)
    Tensors t = qt;
    t[L1 + "experts.4.up_proj.weight"] = t.at(L1 + "experts.0.up_proj.weight");
    cases.push_back({"extra expert", t, q, {"layer 1", L1 + "experts.4.up_proj.weight", "num_experts 4"}});
  }
  {
    Tensors t = qt;
    t.erase(L1 + "experts.3.up_proj.weight");
    cases.push_back({"missing expert", t, q, {"layer 1", L1 + "experts.3.up_proj.weight", "missing"}});
  }
  {
    Tensors t = qt;
    t[L1 + "gate.weight"] = Tensor(DType::F32, {5, 32});
    cases.push_back({"router shape", t, q, {"layer 1", L1 + "gate.weight", "router", "[5, 32]", "[4, 32]"}});
  }
  {
    Tensors t = qt;
    t.erase(L1 + "gate.weight");
    cases.push_back({"router missing", t, q, {"layer 1", L1 + "gate.weight", "missing"}});
  }
  {
    Tensors t = qt;
    t[L1 + "experts.2.down_proj.weight"] = Tensor(DType::F32, {32, 23});
    cases.push_back({"expert shape", t, q, {"layer 1", L1 + "experts.2.down_proj.weight", "[32, 23]", "[32, 24]"}});
  }
  {  // a tensor nothing reads must not vanish from a quantized copy
    Tensors t = qt;
    t[L1 + "experts.0.up_proj.bias"] = Tensor(DType::F32, {24});
    cases.push_back({"expert bias", t, q, {"layer 1", L1 + "experts.0.up_proj.bias"}});
  }
  {
    Tensors t = qt;
    t[L1 + "experts.0.mid_proj.weight"] = Tensor(DType::F32, {24, 32});
    cases.push_back({"unknown projection", t, q, {"layer 1", L1 + "experts.0.mid_proj.weight", "mid_proj"}});
  }
  {  // layer 0 is dense (mlp_only_layers)
    Tensors t = qt;
    t["model.layers.0.mlp.experts.0.up_proj.weight"] = t.at(L1 + "experts.0.up_proj.weight");
    cases.push_back({"expert in a dense layer", t, q, {"layer 0", "model.layers.0.mlp.experts.0.up_proj.weight", "dense"}});
  }
  {  // a fused bank with 3 experts for a config with 4
    Tensors t = calq_test::fuse_experts(qt, qc);
    auto& b = t.at(L1 + "experts.down_proj");
    b.shape[0] = 3;
    b.bytes.resize(b.bytes.size() / 4 * 3);
    cases.push_back({"bank expert count", t, q, {"layer 1", L1 + "experts.down_proj", "holds 3 experts", "num_experts 4"}});
  }
  {  // 2I that does not match moe_intermediate_size
    Tensors t = calq_test::fuse_experts(qt, qc);
    auto& b = t.at(L1 + "experts.gate_up_proj");
    b.shape[1] = 24;
    b.bytes.resize(b.bytes.size() / 2);
    cases.push_back({"bank rows", t, q, {"layer 1", L1 + "experts.gate_up_proj", "[4, 24, 32]", "[4, 48, 32]"}});
  }
  {
    Tensors t = calq_test::fuse_experts(qt, qc);
    auto& b = t.at(L1 + "experts.down_proj");
    b.shape = {4 * 32, 24};
    cases.push_back({"bank rank", t, q, {"layer 1", L1 + "experts.down_proj", "rank 3"}});
  }
  {  // fused and per-expert tensors in one layer
    Tensors t = calq_test::fuse_experts(qt, qc);
    t[L1 + "experts.0.up_proj.weight"] = qt.at(L1 + "experts.0.up_proj.weight");
    cases.push_back({"fused and per-expert", t, q, {"layer 1", L1 + "experts.gate_up_proj", L1 + "experts.0.up_proj.weight"}});
  }
  {  // the same bank under both spellings
    Tensors t = calq_test::fuse_experts(qt, qc);
    t[L1 + "experts.down_proj.weight"] = t.at(L1 + "experts.down_proj");
    cases.push_back({"bank twice", t, q, {L1 + "experts.down_proj.weight", L1 + "experts.down_proj"}});
  }
  {  // another bank kind (GPT-OSS style biases) is not silently dropped
    Tensors t = calq_test::fuse_experts(qt, qc);
    t[L1 + "experts.gate_up_proj_bias"] = Tensor(DType::F32, {4, 48});
    cases.push_back({"unknown bank", t, q, {"layer 1", L1 + "experts.gate_up_proj_bias"}});
  }
  {  // a fused bank cannot be split without the config
    Tensors t = calq_test::fuse_experts(qt, qc);
    cases.push_back({"bank without config.json", t, fs::path(), {"model.layers.1.mlp.experts.down_proj", "config.json"}});
  }
  {  // Mixtral: experts under block_sparse_moe and the router under transformers 5's mlp
    Tensors t = xt;
    auto r = t.extract("model.layers.1.block_sparse_moe.gate.weight");
    r.key() = "model.layers.1.mlp.gate.weight";
    t.insert(std::move(r));
    cases.push_back({"mixtral mixed block names", t, x, {"layer 1", "model.layers.1.mlp.gate.weight", "block_sparse_moe"}});
  }
  {
    Tensors t = xt;
    t.erase("model.layers.0.block_sparse_moe.experts.1.w3.weight");
    cases.push_back({"mixtral missing expert", t, x, {"layer 0", "model.layers.0.block_sparse_moe.experts.1.w3.weight"}});
  }
  {
    Tensors t = calq_test::fuse_experts(xt, xc, {"", true});
    auto& b = t.at("model.layers.0.mlp.experts.gate_up_proj");
    b.shape = {8, 24, 32};  // same bytes, 8 experts of 12 rows
    cases.push_back({"mixtral bank expert count", t, x, {"layer 0", "model.layers.0.mlp.experts.gate_up_proj", "holds 8 experts", "num_local_experts 4"}});
  }
  for (auto& c : cases) {
    SCOPED_TRACE(c.what);
    TempDir t;
    calq_test::write_model(t / "m", c.tensors, c.config);
    const std::string e = open_error(t / "m");
    ASSERT_FALSE(e.empty()) << "opened without an error";
    for (const auto& w : c.want) EXPECT_HAS(e, w);
    EXPECT_HAS(e, (t / "m").string());
  }
}

// A dense config with expert tensors is the wrong config.
TEST(MoeLayout, DenseConfigWithExperts) {
  TempDir t;
  Tensors tensors = calq_test::read_stored(fixture("qwen3_mha"));
  tensors["model.layers.0.mlp.experts.0.up_proj.weight"] = Tensor(DType::F32, {8, 8});
  calq_test::write_model(t / "m", tensors, fixture("qwen3_mha"));
  const std::string e = open_error(t / "m");
  EXPECT_HAS(e, "model.layers.0.mlp.experts.0.up_proj.weight");
  EXPECT_HAS(e, "dense");
}

}  // namespace
