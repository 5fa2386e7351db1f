// Tokenizers: Hugging Face tokenizer.json (BPE with byte-level or SentencePiece-style
// pre-tokenization), SentencePiece tokenizer.model, GPT-2 vocab.json + merges.txt, and tiktoken
// rank files. Token ids match the Hugging Face `tokenizers` library (docs/tokenizers.md).
//
// Invalid UTF-8 in the input is replaced before tokenizing: each maximal ill-formed subpart
// becomes U+FFFD, exactly as Python's bytes.decode("utf-8", errors="replace").
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
  // Special tokens written in the text ("<|endoftext|>") are recognised. Thread-safe.
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

  // Like encode(text, false), but special tokens written in the text are ordinary text (only
  // non-special added tokens are matched), as llama.cpp's tokenize with parse_special=false.
  virtual std::vector<int32_t> encode_plain(std::string_view text) const { return encode(text, false); }
  // encode(text, add_special_tokens) with up to `threads` threads (0: all cores); the result is
  // identical to encode(). Long texts are cut only where the cut provably changes no token.
  virtual std::vector<int32_t> encode_parallel(std::string_view text, bool add_special_tokens,
                                               int threads = 0) const {
    return encode(text, add_special_tokens);
  }
  // Many texts at once, in parallel (0: all cores).
  std::vector<std::vector<int32_t>> encode_batch(std::span<const std::string> texts,
                                                 bool add_special_tokens = false, int threads = 0) const;
  // The token string of an id as the tokenizer file writes it (default: its decoded text).
  virtual std::string id_to_token(int32_t id) const { return decode(std::span<const int32_t>(&id, 1)); }
  // The id of a token string as the tokenizer file writes it; std::nullopt when there is none.
  virtual std::optional<int32_t> token_to_id(std::string_view token) const { return std::nullopt; }
};

// Loads a tokenizer from a model directory (tokenizer.json, else tokenizer.model, else
// vocab.json + merges.txt, else encoder.json + vocab.bpe, else one *.tiktoken file;
// tokenizer_config.json beside it when present) or from one of those files directly. Errors name
// the file and what is wrong.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& model_dir_or_file);

// Replaces each maximal ill-formed subsequence of `s` with U+FFFD (Python's errors="replace").
std::string sanitize_utf8(std::string_view s);
// Whether `s` is well-formed UTF-8.
bool is_valid_utf8(std::string_view s);

}  // namespace calq::text
