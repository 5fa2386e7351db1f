// Calibration and evaluation text: named sources (bartowski-v3, wikitext2, c4) resolved from a
// local path, $CALQ_DATA, the cache or a verified download; local .txt/.json/.jsonl(.gz) files;
// programmatic sample lists. Then selection (dedup, minimum length, seeded shuffle) and
// tokenization into fixed-length calibration sequences.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace calq::text {
class Tokenizer;
}

namespace calq::data {

// How a named source is fetched. `files` are stored in the cache under `cache_name`.
struct SourceFile {
  std::string cache_name;  // file name in $CALQ_DATA / the cache
  std::string url;         // canonical HTTPS address
  std::string sha256;      // of the downloaded file; empty: the server's declared hash is used
  std::string zip_member;  // when the URL is a ZIP archive: the member to keep as cache_name
  std::string member_sha256;  // SHA-256 of that member, when known
};
struct NamedSource {
  std::string name;         // "bartowski-v3", "wikitext2:test", "c4", ...
  std::string description;
  std::vector<SourceFile> files;
  enum class Kind { Paragraphs, WikiRaw, JsonLines } kind;
};
// The named sources calq knows, with their files (for `calq data list` and the docs).
std::vector<NamedSource> named_sources();
// Parses "bartowski-v3", "wikitext2" / "wikitext2:test|validation|train", "c4" / "c4:N" (the
// first N of the 8 validation shards). nullopt when `spec` is not a named source.
std::optional<NamedSource> find_named_source(const std::string& spec,
                                             const std::string& wikitext_default_split = "test");

struct LoadOptions {
  std::string text_field = "text";  // JSON/JSONL field holding the text
  bool skip_bad_lines = false;      // JSONL: count and skip malformed lines instead of failing
  size_t min_chars = 0;             // drop samples shorter than this (characters = bytes)
  bool allow_download = true;       // false (or CALQ_OFFLINE=1): never touch the network
  bool progress = true;
  std::string wikitext_default_split = "test";  // split of a bare "wikitext2"
};

// The seed's CalibrationDataset: samples + name + version + metadata.
struct Dataset {
  std::vector<std::string> samples;
  std::string name = "calibration_dataset";
  std::string version = "v1";
  nlohmann::json metadata = nlohmann::json::object();
  // The source as one document, for perplexity: the raw file when the source is one text file,
  // otherwise the samples joined by "\n\n".
  std::string document;
  size_t skipped_lines = 0;   // JSONL lines skipped with skip_bad_lines
  size_t dropped_short = 0;   // samples under min_chars

  Dataset() = default;
  Dataset(std::vector<std::string> s, std::string n, std::string v);

  // bartowski's calibration_datav3.txt: blank-line separated paragraphs of at least
  // `min_sample_length` characters, the first `max_samples` kept.
  static Dataset v3(std::optional<size_t> max_samples = std::nullopt, size_t min_sample_length = 100,
                    const LoadOptions& opts = {});
  // A local file, by extension: .json (array of strings, or of objects with the text field),
  // .jsonl (objects with the text field, or strings), .gz of either, anything else as text split
  // into blank-line separated paragraphs.
  static Dataset from_local(const std::filesystem::path& file, const LoadOptions& opts = {});
  // A named source or a path (an existing path wins over a name).
  static Dataset load(const std::string& spec, const LoadOptions& opts = {});

  size_t size() const { return samples.size(); }
  // Keeps the first n samples.
  Dataset& truncate(size_t n);
};

// Resolves a named source's files to local paths: $CALQ_DATA, then the cache, then a download
// (when allowed). Offline, the error names each missing file and where to put it.
std::vector<std::filesystem::path> resolve_source(const NamedSource& src, const LoadOptions& opts);

// Splits text into paragraphs at blank (whitespace-only) lines; paragraphs are trimmed of
// surrounding blank lines, and line breaks inside them kept.
std::vector<std::string> split_paragraphs(const std::string& text);

// ---- selection and tokenization ----

enum class Packing { Concatenate, PerSample };
enum class BosMode { Auto, Always, Never };

struct SelectOptions {
  size_t samples = 128;        // sequences to produce
  size_t seq_len = 512;        // tokens per sequence
  uint64_t seed = 0;
  bool shuffle = true;         // deterministic (seeded) shuffle of the samples
  bool dedup = true;           // drop exact duplicate samples (after trimming)
  size_t min_tokens = 0;       // drop samples with fewer tokens (PerSample: defaults to 1)
  Packing packing = Packing::Concatenate;
  BosMode bos = BosMode::Auto; // Auto: BOS first in each sequence when the tokenizer adds one
  std::string separator = "\n\n";  // joins samples when concatenating
};

struct CalibrationSet {
  int64_t seq_len = 0;
  // Each sequence has exactly seq_len ids; positions >= lengths[i] are padding (pad_id) and must
  // be masked out of attention and statistics.
  std::vector<std::vector<int32_t>> tokens;
  std::vector<int64_t> lengths;
  int32_t pad_id = 0;
  size_t samples_used = 0;       // source samples that contributed
  size_t duplicates_removed = 0;
  size_t too_short = 0;
  int64_t real_tokens() const;
};

// Deterministic Fisher-Yates with a portable generator (the same order on every platform).
void seeded_shuffle(std::vector<size_t>& idx, uint64_t seed);

// Builds calibration sequences. Concatenate: samples (shuffled, deduplicated) are tokenized,
// joined into one stream and cut into seq_len windows (each starting with BOS when enabled);
// fewer windows than asked is an error naming how many tokens there were. PerSample: one sample
// per sequence, truncated to seq_len, right-padded; samples under min_tokens are skipped.
CalibrationSet make_calibration_set(const Dataset& ds, const text::Tokenizer& tok, const SelectOptions& opts);

// ---- inspection (`calq data inspect`) ----

struct DomainMix {
  size_t code = 0, math = 0, chat = 0, non_english = 0, prose = 0;
};
// A rough domain label per sample by simple heuristics (documented in docs/datasets.md).
std::string classify_domain(const std::string& sample);

struct DatasetStats {
  size_t samples = 0, characters = 0, duplicates = 0, empty = 0;
  int64_t tokens = -1;              // -1 without a tokenizer
  size_t min_len = 0, max_len = 0;  // in tokens with a tokenizer, else characters
  double mean_len = 0, median_len = 0;
  std::string length_unit;          // "tokens" or "chars"
  // Power-of-two buckets: [0,16), [16,32), ... with the count of samples in each.
  std::vector<std::pair<std::string, size_t>> histogram;
  DomainMix domains;
  nlohmann::json to_json() const;
};
DatasetStats inspect(const Dataset& ds, const text::Tokenizer* tok);

}  // namespace calq::data
