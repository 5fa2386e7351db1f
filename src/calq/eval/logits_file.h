// The base model's log-probabilities saved for a later KL-divergence run (--save-logits /
// --reference-logits). Layout (little-endian), documented in docs/eval.md:
//   "CALQLGP1" | u32 n | n bytes of header JSON | windows... | "CALQEND1" | u64 windows
//   window: u32 rows | rows × (f32 top, u16 codes[vocab]) | u32 CRC-32 of the rows field and data
// Each row stores log p over the vocabulary: code 0 means below top − 24 (p < 4e-11, treated as
// 0), code c ≥ 1 means top − 24 + (c − 1)·24/65534 (error ≤ 1.9e-4 nats).
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/eval/metrics.h"
#include "calq/io/cleanup.h"

namespace calq::eval {

struct LogitsHeader {
  int64_t vocab = 0, ctx = 0, stride = 0, windows = 0;
  std::string method;         // "llama" or "stride"
  std::string windows_sha256; // digest of every window's input and targets (windows_digest)
  std::string model, tokenizer;
  nlohmann::json to_json() const;
  static LogitsHeader from_json(const nlohmann::json& j, const std::string& where);
};

// SHA-256 over the windows' inputs, scored offsets and targets: equal digests mean the same
// text, tokenizer, context and chunking.
std::string windows_digest(const std::vector<Window>& windows);

// Quantizes one row of log-probabilities (as described above) and back.
void encode_logprobs(std::span<const double> lp, float& top, std::span<uint16_t> codes);
void decode_logprobs(float top, std::span<const uint16_t> codes, std::span<double> lp);

class LogitsWriter {
 public:
  // Writes to a temporary sibling; finish() checks the count and renames it into place.
  LogitsWriter(std::filesystem::path path, LogitsHeader header);
  ~LogitsWriter();
  // logprobs: rows × vocab, the scored rows of the next window.
  void add_window(std::span<const double> logprobs, int64_t rows);
  void finish();

 private:
  std::filesystem::path path_, tmp_;
  io::TempGuard guard_;  // removes tmp_ if calq is killed while writing
  LogitsHeader h_;
  std::FILE* f_ = nullptr;
  int64_t written_ = 0;
};

class LogitsReader {
 public:
  // Opens and validates the magic, header, trailer and size. Errors name the file.
  explicit LogitsReader(const std::filesystem::path& path);
  ~LogitsReader();
  const LogitsHeader& header() const { return h_; }
  // Reads the next window's rows (CRC-checked) as log-probabilities: rows × vocab.
  int64_t next_window(std::vector<double>& logprobs);

 private:
  std::filesystem::path path_;
  LogitsHeader h_;
  std::FILE* f_ = nullptr;
  int64_t read_ = 0;
};

}  // namespace calq::eval
