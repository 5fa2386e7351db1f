// SentencePiece tokenizer.model through libsentencepiece.
#include <sentencepiece_processor.h>

#include <fmt/format.h>

#include "calq/core/error.h"
#include "calq/text/detail.h"

namespace calq::text::detail {
namespace {

class SpmTokenizer final : public Tokenizer {
 public:
  SpmTokenizer(const std::filesystem::path& file, const TokenizerConfig& cfg) : file_(file) {
    auto st = sp_.Load(file.string());
    if (!st.ok()) fail("{}: not a SentencePiece model: {}", file.string(), st.ToString());
    add_bos_ = cfg.add_bos_token.value_or(true);  // LlamaTokenizer's defaults
    add_eos_ = cfg.add_eos_token.value_or(false);
    if (sp_.bos_id() >= 0) bos_ = sp_.bos_id();
    if (sp_.eos_id() >= 0) eos_ = sp_.eos_id();
    if (cfg.bos_token) {
      int id = sp_.PieceToId(*cfg.bos_token);
      if (id != sp_.unk_id() || *cfg.bos_token == sp_.IdToPiece(sp_.unk_id())) bos_ = id;
    }
    if (cfg.eos_token) {
      int id = sp_.PieceToId(*cfg.eos_token);
      if (id != sp_.unk_id() || *cfg.eos_token == sp_.IdToPiece(sp_.unk_id())) eos_ = id;
    }
    if (add_bos_ && !bos_) fail("{}: add_bos_token is set but the model has no BOS piece", file.string());
    if (add_eos_ && !eos_) fail("{}: add_eos_token is set but the model has no EOS piece", file.string());
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int> ids;
    std::string clean = sanitize_utf8(text);
    auto st = sp_.Encode(clean, &ids);
    if (!st.ok()) fail("sentencepiece encode failed: {}", st.ToString());
    std::vector<int32_t> out;
    out.reserve(ids.size() + 2);
    if (add_special && add_bos_) out.push_back(*bos_);
    out.insert(out.end(), ids.begin(), ids.end());
    if (add_special && add_eos_) out.push_back(*eos_);
    return out;
  }
  std::string decode(std::span<const int32_t> ids, bool skip_special) const override {
    std::vector<int> v;
    v.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || id >= sp_.GetPieceSize())
        fail("token id {} is outside the vocabulary (size {})", id, sp_.GetPieceSize());
      if (skip_special && sp_.IsControl(id)) continue;
      v.push_back(id);
    }
    std::string out;
    auto st = sp_.Decode(v, &out);
    if (!st.ok()) fail("sentencepiece decode failed: {}", st.ToString());
    return out;
  }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }
  bool adds_bos() const override { return add_bos_; }
  std::string describe() const override {
    return fmt::format("sentencepiece ({}, {} pieces)", file_.filename().string(), sp_.GetPieceSize());
  }
  std::string id_to_token(int32_t id) const override {
    if (id < 0 || id >= sp_.GetPieceSize())
      fail("token id {} is outside the vocabulary (size {})", id, sp_.GetPieceSize());
    return sp_.IdToPiece(id);
  }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    int id = sp_.PieceToId(token);
    if (id == sp_.unk_id() && token != sp_.IdToPiece(id)) return std::nullopt;
    return id;
  }

 private:
  std::filesystem::path file_;
  sentencepiece::SentencePieceProcessor sp_;
  bool add_bos_ = true, add_eos_ = false;
  std::optional<int32_t> bos_, eos_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& file, const TokenizerConfig& cfg) {
  return std::make_unique<SpmTokenizer>(file, cfg);
}

}  // namespace calq::text::detail
