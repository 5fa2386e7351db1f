// Tokenizers: Hugging Face tokenizer.json (BPE with byte-level or SentencePiece-style
// pre-tokenization), SentencePiece tokenizer.model, GPT-2 vocab.json + merges.txt, and tiktoken
// rank files. Token ids match the Hugging Face `tokenizers` library.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace calq::text {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text`. With add_special_tokens, the BOS/EOS (or other template tokens) that the
  // tokenizer's post-processor / tokenizer_config.json adds are added; without, none are.
  virtual std::vector<int32_t> encode(std::string_view text,
                                      bool add_special_tokens = false) const = 0;
  // Text of `ids`; ids outside the vocabulary throw calq::Error.
  virtual std::string decode(std::span<const int32_t> ids,
                             bool skip_special_tokens = false) const = 0;

  // Number of ids (including added tokens): every id is in [0, vocab_size()).
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  // Whether encode(text, true) puts BOS first (llama.cpp's perplexity adds BOS only then).
  virtual bool adds_bos() const = 0;
  // A short description for logs and reports ("bpe (tokenizer.json, byte-level)", ...).
  virtual std::string describe() const = 0;
};

// Loads a tokenizer from a model directory (tokenizer.json, else tokenizer.model, else
// vocab.json + merges.txt, else a tiktoken file; tokenizer_config.json beside it when present) or
// from one of those files directly. Errors name the file and what is wrong.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& model_dir_or_file);

}  // namespace calq::text
