// Internals shared by the tokenizer implementations (not part of the public interface).
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "calq/text/tokenizer.h"

namespace calq::text::detail {

// tokenizer_config.json: the keys that decide BOS/EOS.
struct TokenizerConfig {
  std::optional<bool> add_bos_token, add_eos_token;
  std::optional<std::string> bos_token, eos_token;
  nlohmann::json added_tokens_decoder;  // {"id": {"content": ..., "special": ...}} or null
  bool present = false;
};
TokenizerConfig read_tokenizer_config(const std::filesystem::path& dir);

std::unique_ptr<Tokenizer> load_hf_json(const std::filesystem::path& file, const TokenizerConfig& cfg);
std::unique_ptr<Tokenizer> load_bpe_pair(const std::filesystem::path& vocab, const std::filesystem::path& merges,
                                         const TokenizerConfig& cfg);
std::unique_ptr<Tokenizer> load_tiktoken(const std::filesystem::path& file, const TokenizerConfig& cfg);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& file, const TokenizerConfig& cfg);

}  // namespace calq::text::detail
