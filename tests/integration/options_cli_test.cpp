// Options that no other test drives through the calq binary (an audit of every add_option /
// add_flag against the tests, 2026-12-04): eval --metric layer-error against the Hessian form of
// the same quantity, calibrate's selection options and --overwrite, quantize's --unquantized-inputs,
// --keep-work-dir, --symmetric, --scale-search(-p) and --no-clip-search, generate-model --layers,
// inspect --tensors, export --format / --overwrite, data inspect --no-dedup and data fetch
// --offline. On bench-qwen3-16m (skipped when ../shared is absent).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "calq/engine/engine.h"
#include "decode_spec.h"
#include "support.h"

using namespace calq_test;
using nlohmann::json;

namespace {

std::vector<double> f64(const RawTensor& t) {
  EXPECT_EQ(t.dtype, "F64");
  std::vector<double> v(t.bytes.size() / 8);
  std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
  return v;
}

// Σ_o (a_o)ᵀ H (a_o) over the rows a_o of A [out, n].
double quad(const std::vector<double>& H, const std::vector<double>& A, int64_t out, int64_t n) {
  double s = 0;
  for (int64_t o = 0; o < out; ++o) {
    const double* a = A.data() + o * n;
    for (int64_t i = 0; i < n; ++i) {
      const double* h = H.data() + i * n;
      double t = 0;
      for (int64_t j = 0; j < n; ++j) t += h[j] * a[j];
      s += a[i] * t;
    }
  }
  return s;
}

// A tensor's bytes in a calq output.
std::string tensor_bytes(const fs::path& dir, const std::string& name) {
  const auto t = read_safetensors(dir / "model.safetensors");
  auto it = t.find(name);
  return it == t.end() ? std::string() : it->second.bytes;
}

}  // namespace

// ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ per module, X the base model's calibration inputs, equals
// sqrt(Σ δᵀHδ / Σ wᵀHw) with H = XᵀX/n from `calq calibrate --hessians` on the same selection
// (another code path: the Hessian accumulator instead of the products), for the 14 modules of the
// first and the last layer of an RTN int4 model (all 56: tokens and range); the base against
// itself gives 0 everywhere.
TEST(LayerErrorCli, MatchesTheHessianForm) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string sel = " --calibration bartowski-v3 --samples 4 --seq-len 64";
  auto r = run_calq("-q calibrate -i " + s.m16.string() + " -o " + (t / "cal").string() + sel + " --hessians", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "rtn").string() + " --format int4", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q eval --metric layer-error --model " + (t / "rtn").string() + " --reference " + s.m16.string() + sel +
                   " --json " + (t / "le.json").string(),
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto le = read_json(t / "le.json")["modules"];
  ASSERT_EQ(le.size(), 56u);
  const auto hindex = read_json(t / "cal" / "hessians.json");
  const auto hess = read_safetensors(t / "cal" / "hessians.safetensors");
  auto base = calq::engine::Model::load(s.m16), quant = calq::engine::Model::load(t / "rtn");
  double worst = 0;
  for (const auto& row : le) {
    const std::string mod = row["module"];
    EXPECT_EQ(row["tokens"], 4 * 64) << mod;
    EXPECT_GT(row["rel_error"].get<double>(), 0.01) << mod;
    EXPECT_LT(row["rel_error"].get<double>(), 0.5) << mod;
    if (mod.rfind("model.layers.0.", 0) != 0 && mod.rfind("model.layers.7.", 0) != 0) continue;
    std::string key;
    for (const auto& [k, v] : hindex.items())
      for (const auto& m : v["modules"])
        if (m == mod) key = k;
    ASSERT_FALSE(key.empty()) << mod << " has no Hessian";
    const auto H = f64(hess.at(key + ".hessian"));
    const int64_t n = base.in_features(mod), out = base.out_features(mod);
    ASSERT_EQ(static_cast<int64_t>(H.size()), n * n);
    const auto w = base.weight(mod), wq = quant.weight(mod);
    std::vector<double> W(w.begin(), w.end()), D(w.size());
    for (size_t i = 0; i < w.size(); ++i) D[i] = static_cast<double>(w[i]) - wq[i];
    const double want = std::sqrt(quad(H, D, out, n) / quad(H, W, out, n));
    const double got = row["rel_error"];
    EXPECT_NEAR(got, want, 1e-4 * want) << mod;
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  RecordProperty("layer_error_max_rel_diff_vs_hessian_form", std::to_string(worst));
  r = run_calq("-q eval --metric layer-error --model " + s.m16.string() + " --reference " + s.m16.string() + sel +
                   " --json " + (t / "self.json").string(),
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  for (const auto& row : read_json(t / "self.json")["modules"]) EXPECT_EQ(row["rel_error"], 0.0) << row["module"];
  r = run_calq("-q eval --metric layer-error --model " + (t / "rtn").string() + sel, d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--metric layer-error needs --reference BASE"), std::string::npos) << r.output;
}

// calibrate: the selection follows --calibration FILE, --seed, --packing, --batch (the batch does
// not change the statistics); an existing output needs --overwrite; --offline never downloads.
TEST(CalibrateCli, SelectionOptionsAndOverwrite) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string in = "-q calibrate -i " + s.m16.string() + " --calibration " + s.v3.string() + " --samples 3 --seq-len 48";
  auto r = run_calq(in + " -o " + (t / "a").string() + " --seed 5 --batch 1", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(in + " -o " + (t / "b").string() + " --seed 5 --batch 3", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(t / "a" / "activation_ranges.json"), read_file(t / "b" / "activation_ranges.json"));
  const auto ra = read_json(t / "a" / "calq_calibration_report.json")["calibration"];
  EXPECT_EQ(ra["tokens"], 3 * 48);
  EXPECT_EQ(ra["packing"], "concatenate");
  r = run_calq(in + " -o " + (t / "c").string() + " --seed 6", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(read_file(t / "a" / "activation_ranges.json"), read_file(t / "c" / "activation_ranges.json"))
      << "another seed selected the same sequences";
  r = run_calq(in + " -o " + (t / "p").string() + " --packing per-sample", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto rp = read_json(t / "p" / "calq_calibration_report.json")["calibration"];
  EXPECT_EQ(rp["packing"], "per-sample");
  EXPECT_LE(rp["tokens"].get<int64_t>(), 3 * 48);  // one sample per sequence, right-padded
  // An existing output.
  r = run_calq(in + " -o " + (t / "a").string(), d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  r = run_calq(in + " -o " + (t / "a").string() + " --overwrite --seed 6", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(t / "a" / "activation_ranges.json"), read_file(t / "c" / "activation_ranges.json"));
  // --offline without CALQ_OFFLINE: a source that is not cached is an error naming the file.
  r = run("timeout 60 env CALQ_DATA=" + d.string() + " " + calq_bin() + " calibrate -i " + s.m16.string() + " -o " +
          (t / "x").string() + " --calibration c4 --offline 2>&1");
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("c4-validation.00000-of-00008.json.gz"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "x"));
}

// quantize: --unquantized-inputs feeds every layer the unquantized model's activations (layer 0's
// inputs are the embeddings either way: the same codes there, other codes after); --keep-work-dir
// keeps the checkpoints; --symmetric is the default; --scale-search is the clip search with its
// grid; --no-clip-search turns activation-aware RTN's clip search off.
TEST(QuantizeCli, LessCommonOptions) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string q = "-q quantize -i " + s.m16.string() + " -o ";
  const std::string g = " --method gptq --format int4 --samples 4 --seq-len 64 --calib-batch 2";
  auto r = run_calq(q + (t / "seq").string() + g + " --keep-work-dir", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  ASSERT_TRUE(fs::exists(t / "seq.calq-work" / "state.json"));
  EXPECT_EQ(read_json(t / "seq.calq-work" / "state.json")["completed_layers"], 8);
  EXPECT_TRUE(fs::exists(t / "seq.calq-work" / "layer_00007"));
  r = run_calq(q + (t / "unq").string() + g + " --unquantized-inputs", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_FALSE(fs::exists(t / "unq.calq-work"));
  EXPECT_EQ(read_json(t / "unq" / "calq_report.json")["gptq"]["quantized_inputs"], false);
  EXPECT_EQ(read_json(t / "seq" / "calq_report.json")["gptq"]["quantized_inputs"], true);
  int differ = 0;
  for (const char* mod : {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}) {
    const std::string l0 = std::string("model.layers.0.") + mod + ".weight_packed";
    const std::string l3 = std::string("model.layers.3.") + mod + ".weight_packed";
    ASSERT_FALSE(tensor_bytes(t / "seq", l0).empty()) << l0;
    // Layer 0's q/k/v see the embeddings in both modes; o_proj and later see layer 0's own
    // quantized modules with true-sequential, its unquantized ones otherwise.
    if (std::string(mod) == "self_attn.q_proj") EXPECT_EQ(tensor_bytes(t / "seq", l0), tensor_bytes(t / "unq", l0));
    differ += tensor_bytes(t / "seq", l3) != tensor_bytes(t / "unq", l3);
  }
  EXPECT_GT(differ, 0) << "--unquantized-inputs changed nothing in layer 3";

  r = run_calq(q + (t / "rtn").string() + " --format int4", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + (t / "sym").string() + " --format int4 --symmetric", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(t / "rtn" / "model.safetensors"), read_file(t / "sym" / "model.safetensors"));
  r = run_calq(q + (t / "x").string() + " --format int4 --symmetric --asymmetric", d);
  EXPECT_EQ(r.rc, 1) << r.output;

  // --scale-search = --clip-search over 100 shrink factors down to 0.2 with the p-norm.
  for (const std::string p : {"2.4", "3"}) {
    r = run_calq(q + (t / ("ss" + p)).string() + " --format nvfp4 --scale-search" +
                     (p == "2.4" ? std::string() : " --scale-search-p " + p),
                 d);
    ASSERT_EQ(r.rc, 0) << r.output;
    r = run_calq(q + (t / ("cs" + p)).string() + " --format nvfp4 --clip-search --clip-grid 100 --clip-min 0.2 --clip-norm " + p, d);
    ASSERT_EQ(r.rc, 0) << r.output;
    EXPECT_EQ(read_file(t / ("ss" + p) / "model.safetensors"), read_file(t / ("cs" + p) / "model.safetensors")) << p;
  }
  EXPECT_NE(read_file(t / "ss2.4" / "model.safetensors"), read_file(t / "ss3" / "model.safetensors"));
  r = run_calq(q + (t / "x").string() + " --format nvfp4 --scale-search-p 3", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--scale-search-p needs --scale-search"), std::string::npos) << r.output;

  // Activation-aware RTN: the clip search is on by default, --no-clip-search turns it off.
  const std::string act = " --format int4 --calibration bartowski-v3 --samples 4 --seq-len 64";
  r = run_calq(q + (t / "act").string() + act, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + (t / "act_noclip").string() + act + " --no-clip-search", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(read_file(t / "act" / "model.safetensors"), read_file(t / "act_noclip" / "model.safetensors"));
  r = run_calq(q + (t / "x").string() + " --format int4 --no-clip-search", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--no-clip-search applies to --method rtn with --calibration"), std::string::npos) << r.output;
}

// generate-model --layers and --overwrite; inspect --tensors lists what it wrote; export --format
// gguf and --overwrite.
TEST(ModelCli, GenerateLayersInspectTensorsExportOverwrite) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string gen = "-q generate-model -c " + s.m16.string() + " -o " + (t / "g").string() + " --dtype bf16 --layers 2";
  auto r = run_calq(gen, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "g" / "config.json")["num_hidden_layers"], 2);
  r = run_calq(gen, d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  r = run_calq(gen + " --overwrite --seed 3", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})  // for the GGUF export below
    fs::copy_file(s.m16 / f, t / "g" / f);
  r = run_calq("inspect " + (t / "g").string() + " --tensors", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("model.layers.1.mlp.down_proj.weight"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("model.layers.2."), std::string::npos) << r.output;
  r = run_calq("inspect " + (t / "g").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(r.output.find("model.layers.1.mlp.down_proj.weight"), std::string::npos) << "listed without --tensors";

  const fs::path gguf = t / "g.gguf";
  r = run_calq("-q export -i " + (t / "g").string() + " -o " + gguf.string() + " --format gguf", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  ASSERT_TRUE(fs::exists(gguf));
  const auto size = fs::file_size(gguf);
  r = run_calq("-q export -i " + (t / "g").string() + " -o " + gguf.string(), d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  r = run_calq("-q export -i " + (t / "g").string() + " -o " + gguf.string() + " --overwrite --outtype f32", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_GT(fs::file_size(gguf), size) << "f32 replaced the bf16 file";
  r = run_calq("-q export -i " + (t / "g").string() + " -o " + gguf.string() + " --overwrite --format onnx", d);
  EXPECT_NE(r.rc, 0);
}

// data inspect --no-dedup keeps repeated samples in the selection (the v3 text has 22); data fetch
// --offline reports a missing file instead of downloading it.
TEST(DataCli, NoDedupAndFetchOffline) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string ins = "-q data inspect --calibration " + s.v3.string() + " --tokenizer " + s.m16.string() +
                          " --samples 4 --seq-len 32 --json ";
  auto r = run_calq(ins + (t / "a.json").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(ins + (t / "b.json").string() + " --no-dedup", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto a = read_json(t / "a.json"), b = read_json(t / "b.json");
  EXPECT_EQ(a["duplicates"], 22);  // exact repeats in the file, counted either way
  EXPECT_EQ(a["selection"]["duplicates_removed"], 22);
  EXPECT_EQ(b["selection"]["duplicates_removed"], 0);
  r = run("timeout 60 env CALQ_DATA=" + d.string() + " " + calq_bin() + " data fetch c4 --offline 2>&1");
  EXPECT_NE(r.output.find("c4-validation.00000-of-00008.json.gz"), std::string::npos) << r.output;
}

// --override REGEX=FORMAT[:GROUP]: the matching modules take that format and group (first match
// wins), the others the default (the stored shapes say which); int8 down projections are much
// closer to the base weights than int4 ones.
TEST(QuantizeCli, OverrideFormatsPerModule) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string q = "-q quantize -i " + s.m16.string() + " --format int4 -o ";
  auto r = run_calq(q + (t / "ov").string() + " --override 'mlp\\.down_proj=int8' --override 'self_attn\\.(q|k)_proj=int4:32'" +
                        " --override 'q_proj=int8'",
                    d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + (t / "plain").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto ov = read_safetensors(t / "ov" / "model.safetensors");
  for (int l : {0, 7}) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    EXPECT_EQ(ov.at(p + "mlp.down_proj.weight_packed").shape, (std::vector<int64_t>{384, 1024 / 4}));  // 8 bits
    EXPECT_EQ(ov.at(p + "mlp.gate_proj.weight_packed").shape, (std::vector<int64_t>{1024, 384 / 8}));  // 4 bits
    EXPECT_EQ(ov.at(p + "self_attn.q_proj.weight_scale").shape, (std::vector<int64_t>{384, 384 / 32}));  // first match
    EXPECT_EQ(ov.at(p + "self_attn.k_proj.weight_scale").shape, (std::vector<int64_t>{128, 384 / 32}));
    EXPECT_EQ(ov.at(p + "self_attn.v_proj.weight_scale").shape, (std::vector<int64_t>{128, 384 / 128}));
  }
  auto base = calq::engine::Model::load(s.m16), a = calq::engine::Model::load(t / "ov"),
       b = calq::engine::Model::load(t / "plain");
  const std::string mod = "model.layers.3.mlp.down_proj";
  const auto w = base.weight(mod), w8 = a.weight(mod), w4 = b.weight(mod);
  double e8 = 0, e4 = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    e8 += (w8[i] - w[i]) * (w8[i] - w[i]);
    e4 += (w4[i] - w[i]) * (w4[i] - w[i]);
  }
  EXPECT_LT(e8, 0.01 * e4);
  r = run_calq(q + (t / "x").string() + " --override 'down_proj'", d);
  EXPECT_EQ(r.rc, 1) << r.output;
}

// The MoE options through the binary on a random Qwen3-MoE (made by generate-model): all-experts
// calibration, a shared Hessian per position, and a Hessian budget of one expert per pass (more
// passes, the same codes as one pass), each reported.
TEST(QuantizeCli, MoeOptionsRun) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  json c = {{"architectures", {"Qwen3MoeForCausalLM"}}, {"model_type", "qwen3_moe"}, {"hidden_act", "silu"},
            {"hidden_size", 64}, {"intermediate_size", 128}, {"moe_intermediate_size", 32}, {"num_experts", 8},
            {"num_experts_per_tok", 2}, {"norm_topk_prob", true}, {"decoder_sparse_step", 1},
            {"mlp_only_layers", json::array()}, {"head_dim", 16}, {"num_attention_heads", 4},
            {"num_key_value_heads", 2}, {"num_hidden_layers", 2}, {"max_position_embeddings", 256},
            {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"tie_word_embeddings", false}, {"vocab_size", 8192}};
  fs::create_directories(t / "cfg");
  write_file(t / "cfg" / "config.json", c.dump());
  auto r = run_calq("-q generate-model -c " + (t / "cfg").string() + " -o " + (t / "moe").string() + " --dtype bf16", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(s.m16 / f, t / "moe" / f);
  const std::string q = "-q quantize -i " + (t / "moe").string() +
                        " --method gptq --format int4 --group-size 16 --samples 6 --seq-len 48 -o ";
  struct Run {
    const char* name;
    std::string args;
  };
  for (const Run& run_ : {Run{"routed", ""}, Run{"all", " --moe-calibration all-experts"},
                          Run{"shared", " --moe-hessian shared"}, Run{"small", " --moe-hessian-memory 1KB"},
                          Run{"one_thread", " --moe-threads 1"}, Run{"uniform", " --moe-token-weight uniform"},
                          Run{"routing", " --moe-token-weight routing"}}) {
    r = run_calq(q + (t / run_.name).string() + run_.args, d);
    ASSERT_EQ(r.rc, 0) << run_.name << ": " << r.output;
  }
  const auto routed = read_json(t / "routed" / "calq_report.json"), all = read_json(t / "all" / "calq_report.json"),
             shared = read_json(t / "shared" / "calq_report.json");
  EXPECT_EQ(routed["moe"]["calibration"], "routed");
  EXPECT_EQ(all["moe"]["calibration"], "all-experts");
  EXPECT_EQ(shared["moe"]["hessian"], "shared");
  // One expert's Hessians per pass changes how often the layer runs, not the result.
  EXPECT_EQ(read_file(t / "routed" / "model.safetensors"), read_file(t / "small" / "model.safetensors"));
  EXPECT_NE(read_file(t / "routed" / "model.safetensors"), read_file(t / "all" / "model.safetensors"));
  EXPECT_NE(read_file(t / "routed" / "model.safetensors"), read_file(t / "shared" / "model.safetensors"));
  // Threads do not change the result either; the token weighting does, and is reported.
  EXPECT_EQ(read_file(t / "routed" / "model.safetensors"), read_file(t / "one_thread" / "model.safetensors"));
  EXPECT_EQ(read_json(t / "uniform" / "calq_report.json")["moe"]["token_weight"], "uniform");
  EXPECT_EQ(read_json(t / "routing" / "calq_report.json")["moe"]["token_weight"], "routing");
  EXPECT_NE(read_file(t / "uniform" / "model.safetensors"), read_file(t / "routing" / "model.safetensors"));
}

// --act-order --no-static-groups: groups follow GPTQ's processing order, so every module carries
// weight_g_idx (each group index on exactly group-size columns), and the engine's dequantized
// weights equal the format spec's decoding with those groups (tests/decode_spec.h). Writing it
// failed until 2026-12-04 (the tensor was not declared up front). --block-size (the lazy-update
// batch) does not change the codes beyond rounding.
TEST(QuantizeCli, ActOrderGroupsInProcessingOrder) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string q = "-q quantize -i " + s.m16.string() + " --method gptq --format int4 --samples 4 --seq-len 64 -o ";
  auto r = run_calq(q + (t / "dyn").string() + " --act-order --no-static-groups", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto gq = read_json(t / "dyn" / "calq_report.json")["gptq"];
  EXPECT_EQ(gq["act_order"], true);
  EXPECT_EQ(gq["static_groups"], false);
  auto tensors = read_safetensors(t / "dyn" / "model.safetensors");
  auto m = calq::engine::Model::load(t / "dyn");
  int modules = 0;
  for (const auto& mod : m.linear_modules()) {
    if (!tensors.count(mod + ".weight_packed")) continue;
    ++modules;
    const auto dm = decode_module(tensors, mod, "int4", true, 128, json());
    ASSERT_EQ(dm.g_idx.size(), static_cast<size_t>(dm.cols)) << mod << " has no g_idx";
    std::vector<int64_t> count(static_cast<size_t>(dm.cols / 128), 0);
    for (int32_t g : dm.g_idx) ++count[static_cast<size_t>(g)];
    for (int64_t c : count) EXPECT_EQ(c, 128) << mod;
    bool in_order = true;  // act-order moves columns: g_idx is not c / 128
    for (int64_t c = 0; c < dm.cols; ++c) in_order = in_order && dm.g_idx[static_cast<size_t>(c)] == c / 128;
    EXPECT_FALSE(in_order) << mod;
    const auto w = m.weight(mod);
    ASSERT_EQ(w.size(), dm.values.size());
    for (size_t i = 0; i < w.size(); ++i) ASSERT_EQ(w[i], static_cast<float>(dm.values[i])) << mod << " at " << i;
  }
  EXPECT_EQ(modules, 56);
  r = run_calq(q + (t / "static").string() + " --act-order", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  for (const auto& [name, tensor] : read_safetensors(t / "static" / "model.safetensors"))
    EXPECT_EQ(name.find("g_idx"), std::string::npos) << name << ": static groups need no g_idx";

  r = run_calq(q + (t / "b128").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + (t / "b32").string() + " --block-size 32", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "b32" / "calq_report.json")["gptq"]["block_size"], 32);
  const auto a = read_safetensors(t / "b128" / "model.safetensors"), b = read_safetensors(t / "b32" / "model.safetensors");
  int64_t same = 0, total = 0;
  for (const auto& [name, x] : a) {
    if (name.find("weight_packed") == std::string::npos) continue;
    const auto& y = b.at(name).bytes;
    for (size_t i = 0; i < x.bytes.size(); ++i) {
      const auto u = static_cast<unsigned char>(x.bytes[i]), v = static_cast<unsigned char>(y[i]);
      same += ((u & 15) == (v & 15)) + ((u >> 4) == (v >> 4));
      total += 2;
    }
  }
  EXPECT_GE(static_cast<double>(same) / static_cast<double>(total), 0.999);
}

// Activation-aware RTN's --act-grid (recorded in the config, other scales), MR-GPTQ's --no-hadamard
// (no rotation stored), calibrate's --percentile / --smooth-factor (recorded; the 50th percentile of
// |x| below the 99.9th, which is at most the maximum).
TEST(QuantizeCli, ActGridNoHadamardAndCalibratePercentile) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string q = "-q quantize -i " + s.m16.string() + " -o ";
  const std::string act = " --format int4 --calibration bartowski-v3 --samples 4 --seq-len 64";
  auto r = run_calq(q + (t / "g20").string() + act, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + (t / "g3").string() + act + " --act-grid 3", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "g3" / "config.json")["quantization_config"]["calq"]["act_scale"]["grid"], 3);
  EXPECT_NE(read_file(t / "g20" / "model.safetensors"), read_file(t / "g3" / "model.safetensors"));

  const std::string mr = " --method mr-gptq --format nvfp4 --samples 4 --seq-len 64";
  r = run_calq(q + (t / "mr").string() + mr, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + (t / "mr_plain").string() + mr + " --no-hadamard", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  int rotated = 0, rotated_plain = 0;
  for (const auto& [name, x] : read_safetensors(t / "mr" / "model.safetensors")) rotated += name.find(".rotation_signs") != std::string::npos;
  for (const auto& [name, x] : read_safetensors(t / "mr_plain" / "model.safetensors"))
    rotated_plain += name.find(".rotation_signs") != std::string::npos;
  EXPECT_EQ(rotated, 56);
  EXPECT_EQ(rotated_plain, 0);
  r = run_calq(q + (t / "x").string() + mr + " --no-hadamard --hadamard-block 64", d);
  EXPECT_EQ(r.rc, 1) << r.output;

  const std::string cal = "-q calibrate -i " + s.m16.string() + " --samples 2 --seq-len 32 -o ";
  r = run_calq(cal + (t / "p999").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(cal + (t / "p50").string() + " --percentile 50 --smooth-factor 0.5", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto a = read_json(t / "p999" / "activation_ranges.json"), b = read_json(t / "p50" / "activation_ranges.json");
  EXPECT_EQ(b["percentile"], 50.0);
  EXPECT_EQ(b["smooth_factor"], 0.5);
  EXPECT_EQ(a["smooth_factor"], 0.8);
  ASSERT_EQ(a["detailed_stats"].size(), b["detailed_stats"].size());
  for (const auto& [mod, st] : a["detailed_stats"].items()) {
    const double p999 = st["percentile_absmax"], p50 = b["detailed_stats"][mod]["percentile_absmax"], mx = st["absmax"];
    EXPECT_LT(p50, p999) << mod;
    EXPECT_LE(p999, mx * 1.011) << mod;  // histogram upper bin edge: at most 1.1 % high
    EXPECT_EQ(b["detailed_stats"][mod]["absmax"], st["absmax"]) << mod << ": the same inputs";
  }
}

// data inspect on a JSONL file: --field picks the text, a malformed line is an error naming it
// unless --skip-bad-lines (counted), --min-chars drops short samples (counted); an absent field is
// an error. eval --field reads the same way (the perplexity of the text itself).
TEST(DataCli, JsonlFieldsBadLinesAndMinChars) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  // 20 ASCII samples of exactly 3000 characters (words, no surrounding spaces), a bad line after
  // the fourth.
  std::string jsonl;
  const char* words[] = {"river", "stone", "light", "market", "window", "garden", "signal", "paper"};
  for (int i = 0; i < 20; ++i) {
    std::string part;
    for (int w = 0; part.size() < 3000; ++w) part += std::string(words[(i + w) % 8]) + " ";
    part = part.substr(0, 2999) + "x";
    jsonl += json{{"id", i}, {"body", part}}.dump() + "\n";
    if (i == 3) jsonl += "{not json\n";
  }
  write_file(t / "s.jsonl", jsonl);
  auto r = run_calq("-q data inspect --calibration " + (t / "s.jsonl").string() + " --field body", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("s.jsonl:5: not valid JSON"), std::string::npos) << r.output;
  r = run_calq("-q data inspect --calibration " + (t / "s.jsonl").string() + " --field body --skip-bad-lines --json " +
                   (t / "a.json").string(),
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto a = read_json(t / "a.json");
  EXPECT_EQ(a["skipped_lines"], 1);
  EXPECT_EQ(a["samples"], 20);
  EXPECT_EQ(a["characters"], 60000);
  EXPECT_EQ(a["dropped_short"], 0);
  r = run_calq("-q data inspect --calibration " + (t / "s.jsonl").string() + " --field body --skip-bad-lines --min-chars 3001",
               d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("the dataset is empty (20 samples shorter than 3001 characters dropped)"), std::string::npos)
      << r.output;
  r = run_calq("-q data inspect --calibration " + (t / "s.jsonl").string() + " --field title --skip-bad-lines", d);
  EXPECT_EQ(r.rc, 1) << r.output;
  // eval --field: the same samples as a JSONL field and as blank-line separated paragraphs of a
  // text file give the same perplexity.
  std::string paragraphs, clean;
  for (int i = 0; i < 12; ++i) {
    std::string p;
    for (int w = 0; w < 120; ++w) p += std::string(words[(i * 7 + w * 3) % 8]) + (w + 1 < 120 ? " " : "");
    paragraphs += p + (i + 1 < 12 ? "\n\n" : "\n");
    clean += json{{"body", p}}.dump() + "\n";
  }
  write_file(t / "e.txt", paragraphs);
  write_file(t / "e.jsonl", clean);
  const std::string ev = "-q eval --model " + s.m16.string() + " --ctx 64 --chunks 4 --dataset ";
  r = run_calq(ev + (t / "e.txt").string() + " --json " + (t / "et.json").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(ev + (t / "e.jsonl").string() + " --field body --json " + (t / "ej.json").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "et.json")["ppl"], read_json(t / "ej.json")["ppl"]);
  EXPECT_EQ(read_json(t / "ej.json")["tokens_scored"], read_json(t / "et.json")["tokens_scored"]);
  r = run_calq(ev + (t / "e.jsonl").string() + " --field title", d);
  EXPECT_EQ(r.rc, 1) << r.output;
}

// data inspect --bos and --no-shuffle, seen in the selection itself: with llama2's tokenizer
// (which adds <s>) auto and always start every sequence with BOS and never starts none; GPT-2's
// adds none, so auto gives none and always gives <|endoftext|> (its BOS); a Qwen3 tokenizer without
// a BOS token refuses always. --no-shuffle starts with the first paragraph of the file; the seeded
// shuffle (seed 3 here) with another one.
TEST(DataCli, BosModesAndSourceOrder) {
  SharedData s;
  const fs::path llama2 = shared_file("data/tokenizers/llama2"), gpt2 = shared_file("data/tokenizers/gpt2");
  if (!s.ok || llama2.empty() || gpt2.empty()) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  std::string text;
  const char* names[] = {"Amber", "Birch", "Cedar", "Dune", "Ember", "Fjord", "Grove", "Heath", "Inlet", "Juniper"};
  for (const char* n : names)
    text += std::string(n) + " was the name of the valley where the river bends twice before the sea.\n\n";
  write_file(t / "p.txt", text);
  const auto inspect = [&](const fs::path& tok, const std::string& extra) {
    const fs::path out = t / "s.json";
    fs::remove(out);
    const auto r = run_calq("-q data inspect --calibration " + (t / "p.txt").string() + " --tokenizer " + tok.string() +
                                " --samples 4 --seq-len 12 --json " + out.string() + " " + extra,
                            d);
    EXPECT_EQ(r.rc, 0) << extra << "\n" << r.output;
    return r.rc == 0 ? read_json(out)["selection"] : json();
  };
  EXPECT_EQ(inspect(llama2, "")["sequences_starting_with_bos"], 4);
  EXPECT_EQ(inspect(llama2, "--bos always")["sequences_starting_with_bos"], 4);
  EXPECT_EQ(inspect(llama2, "--bos never")["sequences_starting_with_bos"], 0);
  EXPECT_EQ(inspect(gpt2, "")["sequences_starting_with_bos"], 0);
  const auto g = inspect(gpt2, "--bos always --no-shuffle");
  EXPECT_EQ(g["sequences_starting_with_bos"], 4);
  EXPECT_EQ(g["first_text"].get<std::string>().rfind("<|endoftext|>Amber was", 0), 0u) << g.dump();
  auto r = run_calq("-q data inspect --calibration " + (t / "p.txt").string() + " --tokenizer " + s.m16.string() +
                        " --samples 4 --seq-len 12 --bos always",
                    d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--bos always: the tokenizer"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("duplicates"), std::string::npos) << "refused only after the statistics:\n" << r.output;
  const auto ordered = inspect(gpt2, "--no-shuffle --bos never");
  EXPECT_EQ(ordered["shuffled"], false);
  EXPECT_EQ(ordered["first_text"].get<std::string>().rfind("Amber was the name", 0), 0u) << ordered.dump();
  const auto shuffled = inspect(gpt2, "--bos never --seed 3");
  EXPECT_EQ(shuffled["shuffled"], true);
  EXPECT_EQ(shuffled["first_text"].get<std::string>().rfind("Amber", 0), std::string::npos) << shuffled.dump();
  EXPECT_NE(shuffled["first_text"].get<std::string>().find(" was the name"), std::string::npos) << shuffled.dump();
}

// generate-model --std: the linear weights are N(0, std²) (sample std within 1.5 % and mean within
// 0.5 % of std, over 393,216 values), norms are 1; --outlier-rate / --outlier-scale scale that share
// of input columns by the scale.
TEST(ModelCli, GenerateStdAndOutliers) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const auto stats = [](const std::vector<float>& v) {
    double m = 0, q = 0;
    for (float x : v) m += x;
    m /= static_cast<double>(v.size());
    for (float x : v) q += (x - m) * (x - m);
    return std::pair<double, double>{m, std::sqrt(q / static_cast<double>(v.size()))};
  };
  auto r = run_calq("-q generate-model -c " + s.m16.string() + " -o " + (t / "g").string() +
                        " --dtype fp32 --layers 1 --std 0.07",
                    d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto w = read_model_tensors(t / "g");
  const auto down = raw_to_float(w.at("model.layers.0.mlp.down_proj.weight"));
  const auto [mean, sd] = stats(down);
  std::printf("--std 0.07: mean %.6f, std %.6f over %zu values\n", mean, sd, down.size());
  EXPECT_NEAR(sd, 0.07, 0.015 * 0.07);
  EXPECT_NEAR(mean, 0.0, 0.005 * 0.07);
  for (float x : raw_to_float(w.at("model.layers.0.input_layernorm.weight"))) ASSERT_EQ(x, 1.0f);
  r = run_calq("-q generate-model -c " + s.m16.string() + " -o " + (t / "o").string() +
                   " --dtype fp32 --layers 1 --std 0.07 --outlier-rate 0.1 --outlier-scale 5",
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  w = read_model_tensors(t / "o");
  const auto& info = w.at("model.layers.0.mlp.down_proj.weight");
  const auto o = raw_to_float(info);
  const int64_t rows = info.shape[0], cols = info.shape[1];
  int64_t outliers = 0;
  double outlier_sd = 0;
  for (int64_t c = 0; c < cols; ++c) {
    std::vector<float> col(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) col[static_cast<size_t>(i)] = o[static_cast<size_t>(i * cols + c)];
    const double csd = stats(col).second;
    if (csd > 0.07 * 2.5) {
      ++outliers;
      outlier_sd += csd;
    }
  }
  std::printf("--outlier-rate 0.1 --outlier-scale 5: %lld of %lld columns, their std %.4f\n",
              static_cast<long long>(outliers), static_cast<long long>(cols), outliers ? outlier_sd / outliers : 0.0);
  EXPECT_NEAR(static_cast<double>(outliers) / static_cast<double>(cols), 0.1, 0.03);
  ASSERT_GT(outliers, 0);
  EXPECT_NEAR(outlier_sd / static_cast<double>(outliers), 0.35, 0.1 * 0.35);
}

// quantize --work-dir: the per-layer checkpoints go there (not OUTPUT.calq-work), --keep-work-dir
// keeps them; a kept work directory is not silently reused by another run (--resume or
// --overwrite), and --overwrite replaces it and writes the same bytes.
TEST(QuantizeCli, WorkDirOption) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string q = "-q quantize -i " + s.m16.string() + " --method gptq --format int4 --samples 4 --seq-len 64" +
                        " --work-dir " + (t / "w").string() + " -o ";
  auto r = run_calq(q + (t / "a").string() + " --keep-work-dir", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_TRUE(fs::exists(t / "w" / "manifest.json"));
  EXPECT_TRUE(fs::exists(t / "w" / "layer_00007"));
  EXPECT_FALSE(fs::exists(t / "a.calq-work"));
  r = run_calq(q + (t / "b").string(), d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("pass --resume to continue it, or --overwrite to discard it"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "b"));
  r = run_calq(q + (t / "b").string() + " --overwrite", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_FALSE(fs::exists(t / "w"));  // removed after success
  expect_same_files(t / "a", t / "b");
}
