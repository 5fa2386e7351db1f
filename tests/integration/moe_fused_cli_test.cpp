// Mixture-of-experts checkpoints through the calq binary: a checkpoint with transformers 5's fused
// expert banks quantizes to exactly the files its per-expert twin gives (quantized and kept
// experts alike, always written per expert), and damaged expert tensors stop quantize (rtn and
// gptq) and eval with an error naming the tensor, before any output is written.
#include "moe_checkpoint.h"
#include "support.h"

using namespace calq_test;

namespace {

fs::path fixture(const std::string& name) { return source_dir() / "tests/data/engine" / name; }

RunResult run_calq(const std::string& args) { return run("CALQ_OFFLINE=1 " + calq_bin() + " " + args); }

// Both output directories hold the same tensors with the same bytes, and the same config.json.
void expect_same_output(const fs::path& a, const fs::path& b) {
  const auto ta = read_model_tensors(a), tb = read_model_tensors(b);
  ASSERT_FALSE(ta.empty());
  ASSERT_EQ(ta.size(), tb.size());
  for (const auto& [n, x] : ta) {
    SCOPED_TRACE(n);
    ASSERT_TRUE(tb.count(n)) << "missing from " << b;
    EXPECT_EQ(tb.at(n).dtype, x.dtype);
    EXPECT_EQ(tb.at(n).shape, x.shape);
    EXPECT_TRUE(tb.at(n).bytes == x.bytes) << "bytes differ";
  }
  EXPECT_EQ(read_file(a / "config.json"), read_file(b / "config.json"));
}

struct Model {
  const char* fixture;
  FuseOptions fuse;
  const char* expert0;  // the first expert's gate projection (module)
};

TEST(MoeFusedCli, RtnOutputEqualsPerExpertInput) {
  for (const Model& m : {Model{"qwen3_moe_sparse", {"", false}, "model.layers.1.mlp.experts.0.gate_proj"},
                         Model{"mixtral", {"", true}, "model.layers.1.block_sparse_moe.experts.0.w1"}}) {
    SCOPED_TRACE(m.fixture);
    TempDir t;
    const fs::path src = fixture(m.fixture);
    const auto cfg = calq::io::load_config(src);
    const Tensors stored = read_stored(src);
    write_model(t / "fused", fuse_experts(stored, cfg, m.fuse), src);

    const std::string q = " --method rtn --format int4 --group-size -1";
    auto r = run_calq("-q quantize -i " + src.string() + " -o " + (t / "q_per").string() + q);
    ASSERT_EQ(r.rc, 0) << r.output;
    r = run_calq("-q quantize -i " + (t / "fused").string() + " -o " + (t / "q_fused").string() + q);
    ASSERT_EQ(r.rc, 0) << r.output;
    expect_same_output(t / "q_per", t / "q_fused");
    const auto out = read_model_tensors(t / "q_fused");
    EXPECT_TRUE(out.count(std::string(m.expert0) + ".weight_packed")) << "experts are quantized per expert";
    for (const auto& [n, x] : out) {
      EXPECT_EQ(n.find("experts.gate_up_proj"), std::string::npos) << n;
      EXPECT_EQ(n.find("experts.down_proj"), std::string::npos) << n;
    }

    // Kept experts: per-expert tensors byte-identical to the slices of the banks.
    r = run_calq("-q quantize -i " + (t / "fused").string() + " -o " + (t / "k_fused").string() + q + " --keep experts");
    ASSERT_EQ(r.rc, 0) << r.output;
    const auto kept = read_model_tensors(t / "k_fused");
    int experts = 0;
    for (const auto& [n, x] : stored) {
      if (n.find(".experts.") == std::string::npos) continue;
      SCOPED_TRACE(n);
      ++experts;
      ASSERT_TRUE(kept.count(n));
      EXPECT_EQ(kept.at(n).shape, x.shape);
      EXPECT_EQ(kept.at(n).bytes.size(), x.bytes.size());
      EXPECT_EQ(std::memcmp(kept.at(n).bytes.data(), x.bytes.data(), x.bytes.size()), 0);
    }
    EXPECT_EQ(experts, 2 * static_cast<int>(cfg.num_experts) * 3);
    r = run_calq("-q quantize -i " + src.string() + " -o " + (t / "k_per").string() + q + " --keep experts");
    ASSERT_EQ(r.rc, 0) << r.output;
    expect_same_output(t / "k_per", t / "k_fused");
  }
}

TEST(MoeFusedCli, BadExpertsStopEveryCommand) {
  const fs::path src = fixture("qwen3_moe_sparse");
  const fs::path m28 = shared_file("data/models/bench-qwen3-28m");
  const auto cfg = calq::io::load_config(src);
  const Tensors stored = read_stored(src);
  struct Case {
    std::string what, tensor;
    Tensors tensors;
  };
  std::vector<Case> cases;
  {
    Tensors t = stored;
    t.erase("model.layers.2.mlp.experts.3.up_proj.weight");
    cases.push_back({"missing expert", "model.layers.2.mlp.experts.3.up_proj.weight", t});
  }
  {
    Tensors t = stored;
    t["model.layers.1.mlp.experts.4.down_proj.weight"] = t.at("model.layers.1.mlp.experts.0.down_proj.weight");
    cases.push_back({"expert 4 of 4", "model.layers.1.mlp.experts.4.down_proj.weight", t});
  }
  {
    Tensors t = stored;
    t["model.layers.1.mlp.gate.weight"] = calq::Tensor(calq::DType::BF16, {4, 31});
    cases.push_back({"router shape", "model.layers.1.mlp.gate.weight", t});
  }
  {
    Tensors t = fuse_experts(stored, cfg);
    auto& b = t.at("model.layers.2.mlp.experts.gate_up_proj");
    b.shape[0] = 2;
    b.bytes.resize(b.bytes.size() / 2);
    cases.push_back({"bank of 2 experts", "model.layers.2.mlp.experts.gate_up_proj", t});
  }
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    TempDir t;
    write_model(t / "m", c.tensors, src);
    const std::string in = " -i " + (t / "m").string();
    for (const std::string method : {"rtn", "gptq"}) {
      SCOPED_TRACE(method);
      auto r = run_calq("-q quantize" + in + " -o " + (t / "q").string() + " --method " + method +
                        " --format int4 --group-size -1" +
                        (method == "gptq" ? " --samples 2 --seq-len 8" : ""));
      EXPECT_EQ(r.rc, 1) << r.output;
      EXPECT_NE(r.output.find(c.tensor), std::string::npos) << r.output;
      EXPECT_EQ(r.output.find("terminate"), std::string::npos) << r.output;
      EXPECT_FALSE(fs::exists(t / "q"));
    }
    // eval reads the tokenizer and the text first: give it both.
    if (m28.empty()) continue;
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(m28 / f, t / "m" / f);
    write_file(t / "text.txt", "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.\n");
    auto r = run_calq("-q eval --model " + (t / "m").string() + " --dataset " + (t / "text.txt").string() +
                      " --ctx 8 --chunks 1");
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find(c.tensor), std::string::npos) << r.output;
  }
}

}  // namespace
