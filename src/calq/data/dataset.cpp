#include "calq/data/dataset.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <unordered_set>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/data/archive.h"
#include "calq/data/fetch.h"
#include "calq/io/atomic.h"
#include "calq/text/tokenizer.h"

namespace calq::data {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- named sources ----

namespace {

constexpr const char* kV3Url =
    "https://gist.githubusercontent.com/bartowski1182/eb213dccb3571f863da82e99418f81e8/raw/"
    "calibration_datav3.txt";
// sha256 of calibration_datav3.txt as copied byte for byte from the gist by mistral.rs
// (calibration_data/calibration_datav3.txt), 279,515 bytes.
constexpr const char* kV3Sha = "200e109bcd2b599fabcceaada7f52bbd1e7c8f9ae030b8dc59c011de039a8026";
constexpr const char* kWikiUrl =
    "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip";
// sha256 of wikitext-2-raw/wiki.test.raw (1,290,590 bytes), the file llama.cpp's
// scripts/get-wikitext-2.sh fetches.
constexpr const char* kWikiTestSha = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08";

NamedSource wikitext(const std::string& split) {
  const std::string file = split == "validation" ? "wiki.valid.raw" : "wiki." + split + ".raw";
  NamedSource s{"wikitext2:" + split,
                "WikiText-2 raw, " + split + " split (the raw file, as llama.cpp's perplexity reads it)",
                {{file, kWikiUrl, "", "wikitext-2-raw/" + file, split == "test" ? kWikiTestSha : ""}},
                NamedSource::Kind::WikiRaw};
  return s;
}

NamedSource c4(int shards) {
  NamedSource s{shards == 1 ? "c4" : fmt::format("c4:{}", shards),
                fmt::format("allenai/c4 en validation, {} of 8 shards (JSON lines, field text)", shards),
                {},
                NamedSource::Kind::JsonLines};
  for (int i = 0; i < shards; ++i) {
    std::string name = fmt::format("c4-validation.{:05d}-of-00008.json.gz", i);
    s.files.push_back({name, "https://huggingface.co/datasets/allenai/c4/resolve/main/en/" + name, "", "", ""});
  }
  return s;
}

}  // namespace

std::vector<NamedSource> named_sources() {
  return {{"bartowski-v3", "bartowski's calibration_datav3.txt: mixed code, chat, math, prose, many languages",
           {{"calibration_datav3.txt", kV3Url, kV3Sha, "", ""}}, NamedSource::Kind::Paragraphs},
          wikitext("test"), wikitext("validation"), wikitext("train"), c4(1)};
}

std::optional<NamedSource> find_named_source(const std::string& spec, const std::string& wiki_default) {
  if (spec == "bartowski-v3" || spec == "v3") return named_sources()[0];
  if (spec == "wikitext2" || spec == "wikitext-2" || spec == "wikitext") return wikitext(wiki_default);
  for (const char* split : {"test", "validation", "train"})
    for (const char* base : {"wikitext2:", "wikitext-2:", "wikitext:"})
      if (spec == std::string(base) + split) return wikitext(split);
  if (spec == "c4") return c4(1);
  if (spec.rfind("c4:", 0) == 0) {
    const std::string n = spec.substr(3);
    CALQ_CHECK(!n.empty() && n.size() <= 1 && n[0] >= '1' && n[0] <= '8',
               "c4:N takes N = 1..8 validation shards, got '{}'", spec);
    return c4(n[0] - '0');
  }
  return std::nullopt;
}

std::vector<fs::path> resolve_source(const NamedSource& src, const LoadOptions& opts) {
  std::vector<fs::path> dirs;
  const char* env = std::getenv("CALQ_DATA");
  if (env && *env) dirs.emplace_back(env);
  const fs::path cache = cache_dir();
  dirs.push_back(cache);
  const char* off = std::getenv("CALQ_OFFLINE");
  const bool online = opts.allow_download && !(off && *off && std::string(off) != "0");

  std::vector<fs::path> out;
  for (const SourceFile& f : src.files) {
    fs::path found;
    for (auto& d : dirs)
      if (fs::is_regular_file(d / f.cache_name)) { found = d / f.cache_name; break; }
    if (found.empty()) {
      if (!online) {
        fail("{}: {} is not in {}{}, and downloads are off. Download {}{} and put {} in {} (or in the "
             "directory named by $CALQ_DATA)",
             src.name, f.cache_name, env && *env ? "$CALQ_DATA (" + std::string(env) + ") nor " : "",
             "the cache (" + cache.string() + ")", f.url,
             f.zip_member.empty() ? "" : " (member " + f.zip_member + ")", f.cache_name, cache.string());
      }
      fs::create_directories(cache);
      found = cache / f.cache_name;
      DownloadOptions d;
      d.sha256 = f.sha256;
      d.progress = opts.progress;
      log_info("{}: downloading {}", src.name, f.url);
      if (f.zip_member.empty()) {
        download_file(f.url, found, d);
      } else {
        const fs::path zip = cache / (".download-" + fs::path(f.url).filename().string());
        try {
          download_file(f.url, zip, d);
          std::string member = zip_extract(zip, f.zip_member);
          if (!f.member_sha256.empty()) {
            const std::string got = sha256_hex(member);
            CALQ_CHECK(got == f.member_sha256, "{}: {} in {} has SHA-256 {}, expected {}", src.name,
                       f.zip_member, f.url, got, f.member_sha256);
          }
          io::write_file_atomic(found, member);
        } catch (...) {
          std::error_code ec;
          fs::remove(zip, ec);
          throw;
        }
        std::error_code ec;
        fs::remove(zip, ec);
      }
    }
    out.push_back(found);
  }
  return out;
}

// ---- parsing ----

std::vector<std::string> split_paragraphs(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  size_t i = 0;
  auto blank = [](std::string_view l) {
    return std::all_of(l.begin(), l.end(), [](unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; });
  };
  while (i < text.size()) {
    size_t nl = text.find('\n', i);
    size_t end = nl == std::string::npos ? text.size() : nl;
    std::string_view line(text.data() + i, end - i);
    if (blank(line)) {
      if (!cur.empty()) out.push_back(std::move(cur));
      cur.clear();
    } else {
      if (!cur.empty()) cur += '\n';
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      cur += line;
    }
    i = nl == std::string::npos ? text.size() : nl + 1;
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

namespace {

std::string read_text(const fs::path& p) {
  CALQ_CHECK(fs::exists(p), "{} does not exist", p.string());
  CALQ_CHECK(fs::is_regular_file(p), "{} is not a regular file", p.string());
  return read_maybe_gzip(p);
}

std::string sample_of(const json& v, const std::string& field, const std::string& where) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object()) {
    auto it = v.find(field);
    CALQ_CHECK(it != v.end(), "{}: no field '{}' (use --field to pick another)", where, field);
    CALQ_CHECK(it->is_string(), "{}: field '{}' is not a string", where, field);
    return it->get<std::string>();
  }
  fail("{}: expected a string or an object with field '{}', got {}", where, field, v.type_name());
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

void apply_min_chars(Dataset& d, size_t min_chars) {
  if (!min_chars) return;
  d.metadata["min_chars"] = min_chars;
  const size_t before = d.samples.size();
  std::erase_if(d.samples, [&](const std::string& s) { return s.size() < min_chars; });
  d.dropped_short += before - d.samples.size();
}

Dataset parse_jsonl(const std::string& text, const std::string& where, const LoadOptions& o) {
  Dataset d;
  size_t lineno = 0, i = 0;
  while (i < text.size()) {
    size_t nl = text.find('\n', i);
    size_t end = nl == std::string::npos ? text.size() : nl;
    std::string_view line(text.data() + i, end - i);
    ++lineno;
    i = nl == std::string::npos ? text.size() : nl + 1;
    if (std::all_of(line.begin(), line.end(), [](unsigned char c) { return std::isspace(c); })) continue;
    const std::string at = fmt::format("{}:{}", where, lineno);
    try {
      json v;
      try {
        v = json::parse(line);
      } catch (const json::parse_error& e) {
        fail("{}: not valid JSON ({})", at, e.what());
      }
      d.samples.push_back(sample_of(v, o.text_field, at));
    } catch (const Error&) {
      if (!o.skip_bad_lines) throw;
      ++d.skipped_lines;
    }
  }
  if (d.skipped_lines) log_warn("{}: skipped {} malformed line(s)", where, d.skipped_lines);
  return d;
}

Dataset parse_json(const std::string& text, const std::string& where, const LoadOptions& o) {
  json v;
  try {
    v = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("{}: not valid JSON ({})", where, e.what());
  }
  if (v.is_object()) {
    for (const char* k : {"samples", "texts", "data", "calibration"})
      if (v.contains(k) && v[k].is_array()) { v = v[k]; break; }
  }
  CALQ_CHECK(v.is_array(), "{}: expected an array of strings (or of objects with field '{}'), or an object "
             "with a 'samples' array", where, o.text_field);
  Dataset d;
  for (size_t k = 0; k < v.size(); ++k) d.samples.push_back(sample_of(v[k], o.text_field, fmt::format("{}[{}]", where, k)));
  return d;
}

void finish(Dataset& d, const std::string& name, const std::string& version, const std::string& source,
            const LoadOptions& o) {
  d.name = name;
  d.version = version;
  d.metadata["source"] = source;
  apply_min_chars(d, o.min_chars);
  if (d.document.empty()) {
    for (size_t k = 0; k < d.samples.size(); ++k) {
      if (k) d.document += "\n\n";
      d.document += d.samples[k];
    }
  }
}

}  // namespace

Dataset::Dataset(std::vector<std::string> s, std::string n, std::string v)
    : samples(std::move(s)), name(std::move(n)), version(std::move(v)) {
  for (size_t k = 0; k < samples.size(); ++k) {
    if (k) document += "\n\n";
    document += samples[k];
  }
}

Dataset& Dataset::truncate(size_t n) {
  if (samples.size() > n) samples.resize(n);
  return *this;
}

Dataset Dataset::from_local(const fs::path& file, const LoadOptions& o) {
  const std::string where = file.string();
  std::string text = read_text(file);
  std::string lower = file.filename().string();
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (ends_with(lower, ".gz")) lower.resize(lower.size() - 3);
  Dataset d;
  if (ends_with(lower, ".jsonl")) {
    d = parse_jsonl(text, where, o);
  } else if (ends_with(lower, ".json")) {
    // A .json that holds one object per line (C4's shards) is JSON lines.
    const size_t first = text.find_first_not_of(" \t\r\n");
    if (first != std::string::npos && text[first] == '{' && text.find("}\n{") != std::string::npos)
      d = parse_jsonl(text, where, o);
    else
      d = parse_json(text, where, o);
  } else {
    d.samples = split_paragraphs(text);
    d.document = std::move(text);
  }
  finish(d, file.stem().string(), "local", where, o);
  CALQ_CHECK(!d.samples.empty(), "{}: the dataset is empty{}", where,
             d.dropped_short ? fmt::format(" ({} samples shorter than {} characters dropped)", d.dropped_short, o.min_chars) : "");
  return d;
}

Dataset Dataset::v3(std::optional<size_t> max_samples, size_t min_sample_length, const LoadOptions& opts) {
  LoadOptions o = opts;
  o.min_chars = std::max(o.min_chars, min_sample_length);
  auto src = *find_named_source("bartowski-v3");
  auto files = resolve_source(src, o);
  Dataset d = from_local(files[0], o);
  d.name = "bartowski-v3";
  d.version = "v3";
  d.metadata["source"] = "bartowski-v3";
  d.metadata["file"] = files[0].string();
  if (max_samples) d.truncate(*max_samples);
  return d;
}

Dataset Dataset::load(const std::string& spec, const LoadOptions& o) {
  CALQ_CHECK(!spec.empty(), "empty dataset name");
  if (fs::exists(spec)) return from_local(spec, o);
  auto src = find_named_source(spec, o.wikitext_default_split);
  if (!src) {
    std::string names;
    for (auto& s : named_sources()) names += (names.empty() ? "" : ", ") + s.name;
    fail("dataset '{}' is neither a file nor a named source ({}, wikitext2, c4:N)", spec, names);
  }
  if (src->name == "bartowski-v3") return v3(std::nullopt, 100, o);
  auto files = resolve_source(*src, o);
  Dataset d;
  if (src->kind == NamedSource::Kind::JsonLines) {
    for (auto& f : files) {
      Dataset part = parse_jsonl(read_text(f), f.string(), o);
      d.samples.insert(d.samples.end(), std::make_move_iterator(part.samples.begin()),
                       std::make_move_iterator(part.samples.end()));
      d.skipped_lines += part.skipped_lines;
    }
  } else {
    d.document = read_text(files[0]);
    d.samples = split_paragraphs(d.document);
  }
  finish(d, src->name, "named", src->name, o);
  d.metadata["files"] = json::array();
  for (auto& f : files) d.metadata["files"].push_back(f.string());
  CALQ_CHECK(!d.samples.empty(), "{}: the dataset is empty", src->name);
  return d;
}

// ---- selection ----

int64_t CalibrationSet::real_tokens() const {
  int64_t n = 0;
  for (auto l : lengths) n += l;
  return n;
}

namespace {
uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
std::string trimmed(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n");
  if (a == std::string::npos) return {};
  const size_t b = s.find_last_not_of(" \t\r\n");
  return s.substr(a, b - a + 1);
}
}  // namespace

void seeded_shuffle(std::vector<size_t>& idx, uint64_t seed) {
  uint64_t state = seed;
  for (size_t i = idx.size(); i > 1; --i) {
    // Uniform j in [0, i) by rejection: no modulo bias, the same result everywhere.
    const uint64_t bound = i;
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r;
    do r = splitmix64(state); while (r >= limit);
    std::swap(idx[i - 1], idx[r % bound]);
  }
}

CalibrationSet make_calibration_set(const Dataset& ds, const text::Tokenizer& tok, const SelectOptions& o) {
  CALQ_CHECK(o.samples > 0, "--samples must be at least 1");
  CALQ_CHECK(o.seq_len >= 2, "--seq-len must be at least 2, got {}", o.seq_len);
  CALQ_CHECK(!ds.samples.empty(), "{}: the dataset is empty", ds.name);
  CalibrationSet cs;
  cs.seq_len = static_cast<int64_t>(o.seq_len);
  // Dedup keeps the first occurrence, before shuffling, so the result does not depend on the seed.
  std::vector<size_t> order;
  std::unordered_set<std::string> seen;
  for (size_t i = 0; i < ds.samples.size(); ++i) {
    std::string t = trimmed(ds.samples[i]);
    if (t.empty()) continue;
    if (o.dedup && !seen.insert(std::move(t)).second) {
      ++cs.duplicates_removed;
      continue;
    }
    order.push_back(i);
  }
  if (o.shuffle) seeded_shuffle(order, o.seed);

  bool bos = false;
  if (o.bos == BosMode::Always) {
    CALQ_CHECK(tok.bos_id().has_value(), "BOS requested but the tokenizer ({}) has no BOS token", tok.describe());
    bos = true;
  } else if (o.bos == BosMode::Auto) {
    bos = tok.adds_bos() && tok.bos_id().has_value();
  }
  const int32_t bos_id = bos ? *tok.bos_id() : 0;
  cs.pad_id = tok.eos_id().value_or(0);
  const size_t body = o.seq_len - (bos ? 1 : 0);

  if (o.packing == Packing::Concatenate) {
    std::vector<int32_t> stream;
    stream.reserve(o.samples * body + 1024);
    const auto sep = o.separator.empty() ? std::vector<int32_t>{} : tok.encode(o.separator, false);
    size_t used = 0, total_tokens = 0;
    for (size_t k = 0; k < order.size() && stream.size() < o.samples * body; ++k) {
      auto ids = tok.encode(ds.samples[order[k]], false);
      if (ids.size() < o.min_tokens) {
        ++cs.too_short;
        continue;
      }
      if (!stream.empty()) stream.insert(stream.end(), sep.begin(), sep.end());
      stream.insert(stream.end(), ids.begin(), ids.end());
      total_tokens += ids.size();
      ++used;
    }
    const size_t windows = std::min(o.samples, stream.size() / body);
    CALQ_CHECK(windows == o.samples,
               "{}: {} samples give {} tokens, enough for {} sequences of {} tokens, not {}: lower "
               "--samples or --seq-len, or use more data",
               ds.name, used, stream.size(), stream.size() / body, o.seq_len, o.samples);
    for (size_t w = 0; w < windows; ++w) {
      std::vector<int32_t> seq;
      seq.reserve(o.seq_len);
      if (bos) seq.push_back(bos_id);
      seq.insert(seq.end(), stream.begin() + static_cast<std::ptrdiff_t>(w * body),
                 stream.begin() + static_cast<std::ptrdiff_t>((w + 1) * body));
      cs.tokens.push_back(std::move(seq));
      cs.lengths.push_back(static_cast<int64_t>(o.seq_len));
    }
    cs.samples_used = used;
    (void)total_tokens;
    return cs;
  }

  const size_t min_tokens = std::max<size_t>(o.min_tokens, 1);
  for (size_t k = 0; k < order.size() && cs.tokens.size() < o.samples; ++k) {
    auto ids = tok.encode(ds.samples[order[k]], false);
    if (ids.size() < min_tokens) {
      ++cs.too_short;
      continue;
    }
    std::vector<int32_t> seq;
    seq.reserve(o.seq_len);
    if (bos) seq.push_back(bos_id);
    const size_t take = std::min(ids.size(), body);
    seq.insert(seq.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(take));
    cs.lengths.push_back(static_cast<int64_t>(seq.size()));
    seq.resize(o.seq_len, cs.pad_id);
    cs.tokens.push_back(std::move(seq));
    ++cs.samples_used;
  }
  CALQ_CHECK(!cs.tokens.empty(), "{}: no sample has at least {} tokens", ds.name, min_tokens);
  if (cs.tokens.size() < o.samples)
    log_warn("{}: only {} samples available of the {} asked for (after dedup and the minimum length)", ds.name,
             cs.tokens.size(), o.samples);
  return cs;
}

// ---- inspection ----

namespace {

size_t codepoints(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

bool starts_with_any(std::string_view line, std::initializer_list<std::string_view> pre) {
  while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
  for (auto p : pre)
    if (line.substr(0, p.size()) == p) return true;
  return false;
}

}  // namespace

std::string classify_domain(const std::string& s) {
  std::vector<std::string_view> lines;
  for (size_t i = 0; i < s.size();) {
    size_t nl = s.find('\n', i);
    size_t end = nl == std::string::npos ? s.size() : nl;
    if (end > i) lines.emplace_back(s.data() + i, end - i);
    i = nl == std::string::npos ? s.size() : nl + 1;
  }
  size_t chat = 0, code = 0;
  for (auto l : lines) {
    if (starts_with_any(l, {"User:", "Assistant:", "Human:", "AI:", "USER:", "ASSISTANT:", "<|im_start|>",
                            "[INST]", "### Instruction", "### Response", "Q:", "A:", "<|user|>", "<|assistant|>"}))
      ++chat;
    const bool kw = starts_with_any(l, {"def ", "class ", "import ", "from ", "#include", "#define", "function ",
                                        "return ", "const ", "let ", "var ", "public ", "private ", "fn ", "for (",
                                        "if (", "while (", "} else", "package ", "using ", "func ", "//", "/*"});
    const char last = l.back();
    const bool punct = last == ';' || last == '{' || last == '}' || last == ')' || l == "}";
    code += kw || punct;
  }
  if (chat >= 2 || (chat == 1 && lines.size() <= 4)) return "chat";
  if (s.find("```") != std::string::npos) return "code";
  if (!lines.empty() && code * 10 >= lines.size() * 3) return "code";
  size_t math_marks = 0, digits_ops = 0, letters = 0, non_ascii_letters = 0;
  for (const char* m : {"\\frac", "\\sum", "\\int", "\\sqrt", "\\(", "\\[", "$$", "^{", "_{", "\\cdot", "\\le", "\\ge"})
    for (size_t p = s.find(m); p != std::string::npos; p = s.find(m, p + 1)) ++math_marks;
  for (size_t i = 0; i < s.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (std::isdigit(c) || c == '+' || c == '=' || c == '*' || c == '/' || c == '^') ++digits_ops;
    if (std::isalpha(c)) ++letters;
    else if (c >= 0xC0) ++non_ascii_letters;  // the lead byte of each non-ASCII character
  }
  const size_t chars = std::max<size_t>(codepoints(s), 1);
  if (math_marks >= 2 || digits_ops * 100 >= chars * 15) return "math";
  if (non_ascii_letters * 10 >= (letters + non_ascii_letters) * 3 && non_ascii_letters > 0) return "non-english";
  return "prose";
}

DatasetStats inspect(const Dataset& ds, const text::Tokenizer* tok) {
  DatasetStats st;
  st.samples = ds.samples.size();
  st.length_unit = tok ? "tokens" : "chars";
  std::unordered_set<std::string> seen;
  std::vector<size_t> lens;
  int64_t tokens = 0;
  for (auto& s : ds.samples) {
    st.characters += codepoints(s);
    std::string t = trimmed(s);
    if (t.empty()) ++st.empty;
    else if (!seen.insert(t).second) ++st.duplicates;
    size_t len = codepoints(s);
    if (tok) {
      len = tok->encode(s, false).size();
      tokens += static_cast<int64_t>(len);
    }
    lens.push_back(len);
    const std::string d = classify_domain(s);
    if (d == "chat") ++st.domains.chat;
    else if (d == "code") ++st.domains.code;
    else if (d == "math") ++st.domains.math;
    else if (d == "non-english") ++st.domains.non_english;
    else ++st.domains.prose;
  }
  if (tok) st.tokens = tokens;
  if (!lens.empty()) {
    std::vector<size_t> sorted = lens;
    std::sort(sorted.begin(), sorted.end());
    st.min_len = sorted.front();
    st.max_len = sorted.back();
    double sum = 0;
    for (auto l : sorted) sum += static_cast<double>(l);
    st.mean_len = sum / static_cast<double>(sorted.size());
    const size_t n = sorted.size();
    st.median_len = n % 2 ? static_cast<double>(sorted[n / 2])
                          : 0.5 * static_cast<double>(sorted[n / 2 - 1] + sorted[n / 2]);
    // Power-of-two buckets from the smallest to the largest length.
    size_t lo = 1;
    while (lo * 2 <= std::max<size_t>(st.min_len, 1)) lo *= 2;
    if (st.min_len == 0) lo = 0;
    size_t start = lo;
    while (true) {
      const size_t end = start == 0 ? 1 : start * 2;
      size_t count = 0;
      for (auto l : sorted) count += l >= start && l < end;
      st.histogram.emplace_back(fmt::format("[{}, {})", start, end), count);
      if (end > st.max_len) break;
      start = end;
    }
  }
  return st;
}

json DatasetStats::to_json() const {
  json j = {{"samples", samples},
            {"characters", characters},
            {"duplicates", duplicates},
            {"empty", empty},
            {"length_unit", length_unit},
            {"min_length", min_len},
            {"max_length", max_len},
            {"mean_length", mean_len},
            {"median_length", median_len}};
  if (tokens >= 0) j["tokens"] = tokens;
  json h = json::array();
  for (auto& [b, c] : histogram) h.push_back({{"bucket", b}, {"count", c}});
  j["histogram"] = h;
  j["domains"] = {{"code", domains.code}, {"math", domains.math}, {"chat", domains.chat},
                  {"non_english", domains.non_english}, {"prose", domains.prose}};
  return j;
}

}  // namespace calq::data
