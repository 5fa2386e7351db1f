// Tokenizer file resolution, tokenizer_config.json, UTF-8 repair and batch encoding.
#include <omp.h>

#include <fstream>

#include "calq/core/error.h"
#include "calq/text/detail.h"

namespace calq::text {

namespace {

// Length of the well-formed UTF-8 sequence at s[i], or -(length of its maximal ill-formed
// subpart) (Unicode 15, table 3-7; the rule Python's errors="replace" follows).
inline int utf8_step(const unsigned char* s, size_t n, size_t i) {
  unsigned char c = s[i];
  if (c < 0x80) return 1;
  int need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) need = 2, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) need = 2;
  else if (c == 0xED) need = 2, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) need = 2;
  else if (c == 0xF0) need = 3, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) need = 3, hi = 0x8F;
  else return -1;
  for (int k = 1; k <= need; ++k) {
    if (i + k >= n) return -k;
    unsigned char d = s[i + k];
    if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) return -k;
  }
  return need + 1;
}

}  // namespace

bool is_valid_utf8(std::string_view sv) {
  auto* s = reinterpret_cast<const unsigned char*>(sv.data());
  size_t n = sv.size(), i = 0;
  while (i < n) {
    if (s[i] < 0x80) { ++i; continue; }
    int k = utf8_step(s, n, i);
    if (k < 0) return false;
    i += k;
  }
  return true;
}

std::string sanitize_utf8(std::string_view sv) {
  if (is_valid_utf8(sv)) return std::string(sv);
  auto* s = reinterpret_cast<const unsigned char*>(sv.data());
  size_t n = sv.size(), i = 0;
  std::string out;
  out.reserve(n + 16);
  while (i < n) {
    int k = utf8_step(s, n, i);
    if (k > 0) {
      out.append(sv.data() + i, k);
      i += k;
    } else {
      out += "\xEF\xBF\xBD";
      i += -k;
    }
  }
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(std::span<const std::string> texts, bool add_special,
                                                          int threads) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  int nt = threads > 0 ? threads : omp_get_max_threads();
  std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (size_t i = 0; i < texts.size(); ++i) {
    try {
      out[i] = encode(texts[i], add_special);
    } catch (...) {
#pragma omp critical
      err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
  return out;
}

namespace detail {

namespace {
std::optional<std::string> token_content(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return std::nullopt;
}
}  // namespace

TokenizerConfig read_tokenizer_config(const std::filesystem::path& dir) {
  TokenizerConfig cfg;
  auto path = dir / "tokenizer_config.json";
  if (!std::filesystem::exists(path)) return cfg;
  std::ifstream f(path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: invalid JSON: {}", path.string(), e.what());
  }
  if (!j.is_object()) fail("{}: expected a JSON object", path.string());
  cfg.present = true;
  if (j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) cfg.add_bos_token = j["add_bos_token"].get<bool>();
  if (j.contains("add_eos_token") && j["add_eos_token"].is_boolean()) cfg.add_eos_token = j["add_eos_token"].get<bool>();
  if (j.contains("bos_token")) cfg.bos_token = token_content(j["bos_token"]);
  if (j.contains("eos_token")) cfg.eos_token = token_content(j["eos_token"]);
  if (j.contains("added_tokens_decoder")) cfg.added_tokens_decoder = j["added_tokens_decoder"];
  return cfg;
}

}  // namespace detail

std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& p) {
  namespace fs = std::filesystem;
  using namespace detail;
  if (!fs::exists(p)) fail("tokenizer: {} does not exist", p.string());
  if (fs::is_directory(p)) {
    auto cfg = read_tokenizer_config(p);
    if (fs::exists(p / "tokenizer.json")) return load_hf_json(p / "tokenizer.json", cfg);
    if (fs::exists(p / "tokenizer.model")) return load_sentencepiece(p / "tokenizer.model", cfg);
    if (fs::exists(p / "vocab.json") && fs::exists(p / "merges.txt"))
      return load_bpe_pair(p / "vocab.json", p / "merges.txt", cfg);
    if (fs::exists(p / "encoder.json") && fs::exists(p / "vocab.bpe"))
      return load_bpe_pair(p / "encoder.json", p / "vocab.bpe", cfg);
    std::vector<fs::path> tik;
    for (const auto& e : fs::directory_iterator(p))
      if (e.path().extension() == ".tiktoken") tik.push_back(e.path());
    if (tik.size() == 1) return load_tiktoken(tik[0], cfg);
    if (tik.size() > 1) fail("tokenizer: {} holds several *.tiktoken files; name one", p.string());
    fail("tokenizer: {} holds no tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
         "encoder.json + vocab.bpe or *.tiktoken file", p.string());
  }
  auto dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  auto cfg = read_tokenizer_config(dir);
  auto name = p.filename().string();
  auto ext = p.extension().string();
  auto need = [&](const fs::path& q) {
    if (!fs::exists(q)) fail("tokenizer: {} needs {} beside it, which does not exist", p.string(), q.string());
    return q;
  };
  if (ext == ".model") return load_sentencepiece(p, cfg);
  if (ext == ".tiktoken") return load_tiktoken(p, cfg);
  if (name == "vocab.json") return load_bpe_pair(p, need(dir / "merges.txt"), cfg);
  if (name == "merges.txt") return load_bpe_pair(need(dir / "vocab.json"), p, cfg);
  if (name == "encoder.json") return load_bpe_pair(p, need(dir / "vocab.bpe"), cfg);
  if (name == "vocab.bpe") return load_bpe_pair(need(dir / "encoder.json"), p, cfg);
  if (ext == ".json") return load_hf_json(p, cfg);
  fail("tokenizer: {}: unknown tokenizer file (expected tokenizer.json, *.model, vocab.json, merges.txt, "
       "encoder.json, vocab.bpe or *.tiktoken)", p.string());
}

}  // namespace calq::text
