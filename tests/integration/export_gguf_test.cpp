// calq export --format gguf on generated llama and qwen3 models with a small byte-level BPE
// tokenizer.json: metadata, vocabulary, tensor names and types, and the weights (LLaMA q/k rows
// permuted as llama.cpp's rope expects), read back with calq's GGUF reader and compared with the
// source safetensors through the test's own decoders.
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "calq/io/gguf.h"
#include "support.h"

using namespace calq_test;
using nlohmann::json;

namespace {

// A byte-level BPE tokenizer.json: the 256 byte symbols, 3 merges, one added special token.
json tiny_tokenizer(int special_id) {
  json vocab = json::object();
  int id = 0;
  // GPT-2's byte-to-unicode map: printable latin-1 bytes map to themselves, the rest to 256+.
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = printable ? b : 256 + extra++;
    std::string s;
    if (cp < 0x80) s += static_cast<char>(cp);
    else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    vocab[s] = id++;
  }
  vocab["th"] = id++;
  vocab["the"] = id++;
  vocab["Ġt"] = id++;
  json t = {{"version", "1.0"},
            {"added_tokens", json::array({{{"id", special_id}, {"content", "<|endoftext|>"}, {"special", true}}})},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers",
               json::array({{{"type", "Split"},
                             {"pattern",
                              {{"Regex",
                                "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
                                "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
                             {"behavior", "Isolated"},
                             {"invert", false}},
                            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
            {"model",
             {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"t h", json::array({"th", "e"}), "Ġ t"})}}}};
  return t;
}

fs::path make_model(const TempDir& t, const std::string& name, json cfg) {
  const fs::path cdir = t / (name + "-config");
  fs::create_directories(cdir);
  write_file(cdir / "config.json", cfg.dump());
  const fs::path m = t / name;
  auto r = run(calq_bin() + " generate-model -c " + cdir.string() + " -o " + m.string() + " --dtype fp32 --seed 3");
  EXPECT_EQ(r.rc, 0) << r.output;
  write_file(m / "tokenizer.json", tiny_tokenizer(static_cast<int>(cfg["vocab_size"].get<int>() - 1)).dump());
  write_file(m / "tokenizer_config.json", json({{"eos_token", "<|endoftext|>"}, {"bos_token", nullptr}}).dump());
  return m;
}

json base_config(const std::string& type, const std::string& archname) {
  auto c = json::parse(read_file(source_dir() / "tests/data/configs/tiny-qwen3.json"));
  c["model_type"] = type;
  c["architectures"] = json::array({archname});
  c["vocab_size"] = 300;
  return c;
}

std::vector<float> gguf_floats(const calq::io::GgufReader& r, const std::string& name) {
  const auto* t = r.tensor(name);
  EXPECT_NE(t, nullptr) << name;
  if (!t) return {};
  auto b = r.read(*t);
  std::vector<float> out;
  if (t->type == calq::io::GgmlType::F32) {
    out.resize(b.size() / 4);
    std::memcpy(out.data(), b.data(), b.size());
  } else {
    out.resize(b.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      uint16_t h;
      std::memcpy(&h, b.data() + 2 * i, 2);
      out[i] = t->type == calq::io::GgmlType::BF16 ? ref_bf16(h) : ref_f16(h);
    }
  }
  return out;
}

}  // namespace

TEST(ExportGguf, LlamaPermutesQkAndWritesTheVocabulary) {
  TempDir t;
  auto cfg = base_config("llama", "LlamaForCausalLM");
  cfg["tie_word_embeddings"] = false;
  cfg["attention_bias"] = true;
  const fs::path m = make_model(t, "llama", cfg);
  auto r = run(calq_bin() + " export -i " + m.string() + " -o " + (t / "m.gguf").string() + " --outtype f32");
  ASSERT_EQ(r.rc, 0) << r.output;
  calq::io::GgufReader g(t / "m.gguf");
  EXPECT_EQ(g.find("general.architecture")->as_str(), "llama");
  EXPECT_EQ(g.find("llama.block_count")->as_u64(), 2u);
  EXPECT_EQ(g.find("llama.attention.head_count")->as_u64(), 4u);
  EXPECT_EQ(g.find("llama.attention.head_count_kv")->as_u64(), 2u);
  EXPECT_EQ(g.find("llama.rope.dimension_count")->as_u64(), 64u);
  EXPECT_EQ(g.find("tokenizer.ggml.model")->as_str(), "gpt2");
  EXPECT_EQ(g.find("tokenizer.ggml.pre")->as_str(), "qwen2");
  const auto& toks = g.find("tokenizer.ggml.tokens")->array;
  const auto& types = g.find("tokenizer.ggml.token_type")->array;
  ASSERT_EQ(toks.size(), 300u);
  EXPECT_EQ(toks[256].as_str(), "th");
  EXPECT_EQ(toks[299].as_str(), "<|endoftext|>");
  EXPECT_EQ(types[299].as_i64(), 3);   // control
  EXPECT_EQ(toks[270].as_str(), "[PAD270]");
  EXPECT_EQ(types[270].as_i64(), 5);   // unused
  EXPECT_EQ(types[65].as_i64(), 1);    // normal
  const auto& merges = g.find("tokenizer.ggml.merges")->array;
  ASSERT_EQ(merges.size(), 3u);
  EXPECT_EQ(merges[1].as_str(), "th e");
  EXPECT_EQ(g.find("tokenizer.ggml.eos_token_id")->as_u64(), 299u);
  EXPECT_EQ(g.find("tokenizer.ggml.bos_token_id")->as_u64(), 0u);  // from config.json

  auto src = read_model_tensors(m);
  EXPECT_EQ(g.tensor("output.weight")->ne, (std::vector<int64_t>{256, 300}));
  EXPECT_EQ(gguf_floats(g, "blk.1.ffn_down.weight"), raw_to_float(src["model.layers.1.mlp.down_proj.weight"]));
  EXPECT_EQ(gguf_floats(g, "blk.0.attn_v.weight"), raw_to_float(src["model.layers.0.self_attn.v_proj.weight"]));
  // q: 4 heads of 64 rows; GGUF row h*64 + 2j + a is HF row h*64 + a*32 + j.
  for (auto [hf, gg, heads] : {std::tuple{"q_proj", "attn_q", 4}, std::tuple{"k_proj", "attn_k", 2}}) {
    auto w = raw_to_float(src[std::string("model.layers.0.self_attn.") + hf + ".weight"]);
    auto p = gguf_floats(g, std::string("blk.0.") + gg + ".weight");
    auto wb = raw_to_float(src[std::string("model.layers.0.self_attn.") + hf + ".bias"]);
    auto pb = gguf_floats(g, std::string("blk.0.") + gg + ".bias");
    ASSERT_EQ(p.size(), w.size());
    for (int h = 0; h < heads; ++h)
      for (int a = 0; a < 2; ++a)
        for (int j = 0; j < 32; ++j) {
          const int src_row = h * 64 + a * 32 + j, dst_row = h * 64 + 2 * j + a;
          for (int c = 0; c < 256; ++c) ASSERT_EQ(p[dst_row * 256 + c], w[src_row * 256 + c]) << hf;
          ASSERT_EQ(pb[dst_row], wb[src_row]) << hf;
        }
  }
}

TEST(ExportGguf, Qwen3Bf16AndErrors) {
  TempDir t;
  const fs::path m = make_model(t, "qwen3", base_config("qwen3", "Qwen3ForCausalLM"));
  auto r = run(calq_bin() + " export -i " + m.string() + " -o " + (t / "q.gguf").string());
  ASSERT_EQ(r.rc, 0) << r.output;
  calq::io::GgufReader g(t / "q.gguf");
  EXPECT_EQ(g.find("general.architecture")->as_str(), "qwen3");
  EXPECT_EQ(g.find("general.file_type")->as_u64(), 32u);
  EXPECT_EQ(g.tensor("blk.0.attn_q.weight")->type, calq::io::GgmlType::BF16);
  EXPECT_EQ(g.tensor("blk.0.attn_q_norm.weight")->type, calq::io::GgmlType::F32);
  EXPECT_EQ(g.tensor("output.weight"), nullptr);  // tied
  auto src = read_model_tensors(m);
  auto w = raw_to_float(src["model.layers.0.self_attn.q_proj.weight"]);
  auto p = gguf_floats(g, "blk.0.attn_q.weight");
  ASSERT_EQ(p.size(), w.size());
  for (size_t i = 0; i < w.size(); ++i) ASSERT_NEAR(p[i], w[i], std::fabs(w[i]) * (1.0 / 256) + 1e-30) << i;  // bf16 RNE

  r = run(calq_bin() + " export -i " + m.string() + " -o " + (t / "q.gguf").string());
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  auto tj = json::parse(read_file(m / "tokenizer.json"));
  tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+";
  write_file(m / "tokenizer.json", tj.dump());
  r = run(calq_bin() + " export -i " + m.string() + " -o " + (t / "x.gguf").string());
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--pre"), std::string::npos) << r.output;
  r = run(calq_bin() + " export -i " + m.string() + " -o " + (t / "x.gguf").string() + " --pre qwen2");
  EXPECT_EQ(r.rc, 0) << r.output;
  fs::remove(m / "tokenizer.json");
  r = run(calq_bin() + " export -i " + m.string() + " -o " + (t / "y.gguf").string());
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("tokenizer.json"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "y.gguf"));
}
