// BPE tokenizers: Hugging Face tokenizer.json, GPT-2 / OpenAI vocab + merges pairs, tiktoken rank
// files. One pipeline, as in `tokenizers`: added tokens -> normalizer -> pre-tokenizer -> BPE ->
// post-processor; decoders for the way back.
//
// Byte-level models keep their vocabulary as raw bytes (the GPT-2 byte<->char table is undone at
// load time), so the BPE starts from one symbol per byte and decoding concatenates bytes.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/ustring.h>
#include <unicode/bytestream.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <fstream>
#include <functional>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "calq/core/error.h"
#include "calq/text/detail.h"

namespace calq::text::detail {
namespace {

using nlohmann::json;

// ---- UTF-8 helpers (input is always well-formed here) ----
inline int u8len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }
inline char32_t u8decode(std::string_view s, size_t i, int* len) {
  auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  int n = u8len(p[0]);
  *len = n;
  if (n == 1) return p[0];
  if (n == 2) return ((p[0] & 0x1F) << 6) | (p[1] & 0x3F);
  if (n == 3) return ((p[0] & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  return ((p[0] & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
}
inline void u8append(std::string& out, char32_t c) {
  if (c < 0x80) out += char(c);
  else if (c < 0x800) { out += char(0xC0 | (c >> 6)); out += char(0x80 | (c & 0x3F)); }
  else if (c < 0x10000) { out += char(0xE0 | (c >> 12)); out += char(0x80 | ((c >> 6) & 0x3F)); out += char(0x80 | (c & 0x3F)); }
  else { out += char(0xF0 | (c >> 18)); out += char(0x80 | ((c >> 12) & 0x3F)); out += char(0x80 | ((c >> 6) & 0x3F)); out += char(0x80 | (c & 0x3F)); }
}

// GPT-2's byte <-> printable char table.
struct ByteTable {
  std::array<char32_t, 256> to_char{};
  std::unordered_map<char32_t, uint8_t> to_byte;
  ByteTable() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      to_char[b] = keep ? char32_t(b) : char32_t(256 + n++);
      to_byte[to_char[b]] = uint8_t(b);
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable t;
  return t;
}
// Byte-level string -> raw bytes; nullopt when a char is outside the table.
std::optional<std::string> unmap_bytes(std::string_view s) {
  const auto& t = byte_table();
  std::string out;
  for (size_t i = 0; i < s.size();) {
    int len;
    char32_t c = u8decode(s, i, &len);
    auto it = t.to_byte.find(c);
    if (it == t.to_byte.end()) return std::nullopt;
    out += char(it->second);
    i += len;
  }
  return out;
}
std::string map_bytes(std::string_view raw) {
  std::string out;
  for (unsigned char b : raw) u8append(out, byte_table().to_char[b]);
  return out;
}

// ---- PCRE2 regex (UTF + UCP, JIT) ----
// One match block per thread, freed when the thread ends.
pcre2_match_data* thread_match_data() {
  struct Holder {
    pcre2_match_data* md = pcre2_match_data_create(32, nullptr);
    ~Holder() { pcre2_match_data_free(md); }
  };
  thread_local Holder h;
  return h.md;
}

class Regex {
 public:
  explicit Regex(const std::string& pattern, const std::string& where) : pattern_(pattern) {
    int err;
    PCRE2_SIZE off;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof buf);
      fail("{}: invalid regex {:?} at offset {}: {}", where, pattern, off, reinterpret_cast<char*>(buf));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  const std::string& pattern() const { return pattern_; }

  // Calls fn(start, end) for each non-empty match, left to right.
  template <typename Fn>
  void for_each_match(std::string_view s, Fn&& fn) const {
    pcre2_match_data* md = thread_match_data();
    size_t pos = 0;
    auto subj = reinterpret_cast<PCRE2_SPTR>(s.data());
    while (pos <= s.size()) {
      int rc = jit_ ? pcre2_jit_match(code_, subj, s.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr)
                    : pcre2_match(code_, subj, s.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail("regex match failed (PCRE2 error {})", rc);
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t a = ov[0], b = ov[1];
      if (b > a) {
        fn(a, b);
        pos = b;
      } else {
        if (a >= s.size()) break;
        pos = a + u8len(static_cast<unsigned char>(s[a]));
      }
    }
  }

 private:
  std::string pattern_;
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// ---- pipeline steps ----
struct Piece {
  std::string s;
  bool at_start;  // begins at offset 0 of the original text
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct NormStep {
  enum Kind { Unicode, Lowercase, Prepend, Replace, Strip } kind;
  const icu::Normalizer2* norm = nullptr;
  std::string a = {}, b = {};  // Prepend: a; Replace: pattern a (string) -> b
  std::shared_ptr<Regex> re = {};
  bool left = false, right = false;
};

struct PreStep {
  enum Kind { Split, ByteLevel, Metaspace } kind;
  std::shared_ptr<Regex> re = {};  // Split; ByteLevel with use_regex
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;
  std::string replacement = {};  // Metaspace
  int prepend = 0;           // 0 always, 1 first, 2 never
  bool split = true;
};

struct DecStep {
  enum Kind { ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace } kind;
  std::string a = {}, b = {};  // Metaspace replacement; Strip content; Replace pattern -> content
  std::shared_ptr<Regex> re = {};
  int start = 0, stop = 0;
  bool prepend = true;
};

struct Added {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, single_word, normalized;
  std::string match = {};  // what is matched: content, or normalize(content) for normalized tokens
};

// Open-addressing map (id pair) -> (rank, merged id).
class PairMap {
 public:
  void build(const std::vector<std::tuple<int32_t, int32_t, uint32_t, int32_t>>& entries) {
    size_t cap = 16;
    while (cap < entries.size() * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, {});
    mask_ = cap - 1;
    for (auto& [a, b, rank, id] : entries) {
      uint64_t k = key(a, b);
      size_t h = hash(k) & mask_;
      while (keys_[h] != kEmpty && keys_[h] != k) h = (h + 1) & mask_;
      if (keys_[h] == k && vals_[h].rank <= rank) continue;  // the first (lowest-rank) merge wins
      keys_[h] = k;
      vals_[h] = {rank, id};
    }
  }
  struct Val {
    uint32_t rank = UINT32_MAX;
    int32_t id = -1;
  };
  inline const Val* find(int32_t a, int32_t b) const {
    if (keys_.empty()) return nullptr;
    uint64_t k = key(a, b);
    size_t h = hash(k) & mask_;
    while (true) {
      uint64_t kk = keys_[h];
      if (kk == k) return &vals_[h];
      if (kk == kEmpty) return nullptr;
      h = (h + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  static size_t hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return size_t(k);
  }
  std::vector<uint64_t> keys_;
  std::vector<Val> vals_;
  size_t mask_ = 0;
};

std::atomic<uint64_t> g_instance{1};

struct WordCache {
  uint64_t owner = 0;
  std::unordered_map<std::string, std::vector<int32_t>> map;
};

class BpeTokenizer final : public Tokenizer {
 public:
  // ---- configuration (filled by the loaders) ----
  std::string description;
  bool byte_level = false;
  std::vector<std::string> vocab;  // id -> token (raw bytes when byte_level)
  std::unordered_map<std::string, int32_t> token_ids;
  std::vector<std::tuple<int32_t, int32_t, uint32_t, int32_t>> merge_list;
  bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
  std::optional<int32_t> unk;
  std::string prefix, suffix;  // continuing_subword_prefix, end_of_word_suffix
  std::vector<NormStep> normalizers;
  std::vector<PreStep> pretok;
  std::vector<DecStep> decoders;
  std::vector<Added> added;
  std::vector<int32_t> post_prefix, post_suffix;
  bool adds_bos_ = false;
  std::optional<int32_t> bos_, eos_;
  bool parallel_safe = false;

  void finish() {
    instance_ = g_instance++;
    merges_.build(merge_list);
    merge_list.clear();
    merge_list.shrink_to_fit();
    byte_ids_.fill(-1);
    if (byte_level)
      for (int b = 0; b < 256; ++b) {
        auto it = token_ids.find(std::string(1, char(b)));
        if (it != token_ids.end()) byte_ids_[b] = it->second;
      }
    if (byte_fallback)
      for (int b = 0; b < 256; ++b) {
        auto it = token_ids.find(fmt::format("<0x{:02X}>", b));
        if (it != token_ids.end()) fallback_ids_[b] = it->second; else fallback_ids_[b] = -1;
      }
    int64_t n = int64_t(vocab.size());
    for (auto& a : added) n = std::max<int64_t>(n, a.id + 1);
    vocab_size_ = n;
    added_by_id_.clear();
    for (size_t i = 0; i < added.size(); ++i) added_by_id_[added[i].id] = i;
    for (auto& a : added) a.match = a.normalized && !normalizers.empty() ? normalize(a.content) : a.content;
    for (int pass = 0; pass < 2; ++pass) {
      auto& idx = by_first_[pass];
      for (auto& v : idx) v.clear();
      for (size_t i = 0; i < added.size(); ++i)
        if (!added[i].match.empty() && added[i].normalized == (pass == 1))
          idx[static_cast<unsigned char>(added[i].match[0])].push_back(i);
      for (auto& v : idx)
        std::stable_sort(v.begin(), v.end(),
                         [&](size_t x, size_t y) { return added[x].match.size() > added[y].match.size(); });
    }
    // Parallel encoding is exact only for the known regex pre-tokenizers (see encode_parallel).
    bool ok_regex = false, ok_other = true;
    for (auto& p : pretok) {
      if (p.kind == PreStep::Split && p.behavior == Behavior::Isolated && !p.invert &&
          (p.re->pattern() == kLlama3Pattern || p.re->pattern() == kQwenPattern || p.re->pattern() == kGpt2Pattern))
        ok_regex = true;
      else if (p.kind == PreStep::ByteLevel && !p.add_prefix_space) {
        if (p.re) ok_regex = true;
      } else
        ok_other = false;
    }
    for (auto& n : normalizers)
      if (!(n.kind == NormStep::Unicode && n.a == "NFC")) ok_other = false;
    for (auto& a : added)
      if (a.lstrip || a.rstrip || a.content.find('\n') != std::string::npos) ok_other = false;
    parallel_safe = ok_regex && ok_other;
  }

  // ---- Tokenizer ----
  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    return encode_impl(text, add_special, true);
  }
  std::vector<int32_t> encode_plain(std::string_view text) const override { return encode_impl(text, false, false); }

  // Cuts at a position p where text[p-1] == '\n' and either text[p] is an ASCII graphic char and
  // text[p-2] is one too, or text[p] == ' ' and text[p+1] is an ASCII graphic char. For the GPT-2,
  // Llama-3 and Qwen patterns, no regex piece contains '\n' followed by a non-whitespace char, and
  // a whitespace piece ending in '\n' ends there whether the text goes on with " X" or ends
  // (the only lookahead, (?!\S), sees ' ' or the end: both are "not \S"); in the first case the
  // '\n' is a whole whitespace run, so "\nX" splits the same with or without X. Matching restarts at
  // p in both cases, and no pattern has lookbehind. NFC never composes across '\n' + an ASCII
  // starter; added tokens contain no '\n' and have no lstrip/rstrip (checked in finish()), and the
  // cut bytes are ASCII, so UTF-8 repair is local too.
  std::vector<int32_t> encode_parallel(std::string_view text, bool add_special, int threads) const override {
    int nt = threads > 0 ? threads : omp_get_max_threads();
    const size_t kMin = 1 << 14;
    if (!parallel_safe || nt <= 1 || text.size() < 2 * kMin) return encode(text, add_special);
    size_t want = std::min<size_t>(size_t(nt) * 8, text.size() / kMin);
    std::vector<size_t> cuts{0};
    auto graphic = [](char c) { return c > 0x20 && c < 0x7F; };
    for (size_t k = 1; k < want; ++k) {
      size_t p = std::max(text.size() * k / want, cuts.back() + 1);
      for (; p + 1 < text.size(); ++p) {
        if (p < 2 || text[p - 1] != '\n') continue;
        if ((graphic(text[p]) && graphic(text[p - 2])) || (text[p] == ' ' && graphic(text[p + 1]))) break;
      }
      if (p + 1 >= text.size()) break;
      cuts.push_back(p);
    }
    cuts.push_back(text.size());
    size_t nchunks = cuts.size() - 1;
    std::vector<std::vector<int32_t>> parts(nchunks);
    std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (size_t i = 0; i < nchunks; ++i) {
      try {
        parts[i] = encode_impl(text.substr(cuts[i], cuts[i + 1] - cuts[i]), false, true);
      } catch (...) {
#pragma omp critical
        err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    std::vector<int32_t> out;
    if (add_special) out = post_prefix;
    for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    if (add_special) out.insert(out.end(), post_suffix.begin(), post_suffix.end());
    return out;
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special) const override {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size_) fail("token id {} is outside the vocabulary (size {})", id, vocab_size_);
      auto it = added_by_id_.find(id);
      if (it != added_by_id_.end()) {
        if (skip_special && added[it->second].special) continue;
        // As `tokenizers`: a normalized added token decodes as its normalized form.
        toks.push_back(added[it->second].match);
      } else if (size_t(id) < vocab.size()) {
        toks.push_back(byte_level ? map_bytes(vocab[id]) : vocab[id]);
      } else {
        fail("token id {} has no token in this vocabulary", id);
      }
    }
    for (const auto& d : decoders) apply_decoder(d, toks);
    std::string out;
    for (auto& t : toks) out += t;
    return sanitize_utf8(out);
  }

  int64_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }
  bool adds_bos() const override { return adds_bos_; }
  std::string describe() const override { return description; }
  std::string id_to_token(int32_t id) const override {
    if (id < 0 || id >= vocab_size_) fail("token id {} is outside the vocabulary (size {})", id, vocab_size_);
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return added[it->second].content;
    if (size_t(id) >= vocab.size()) fail("token id {} has no token in this vocabulary", id);
    return byte_level ? map_bytes(vocab[id]) : vocab[id];
  }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    for (auto& a : added)
      if (a.content == token) return a.id;
    std::string key(token);
    if (byte_level) {
      auto raw = unmap_bytes(token);
      if (!raw) return std::nullopt;
      key = *raw;
    }
    auto it = token_ids.find(key);
    if (it == token_ids.end()) return std::nullopt;
    return it->second;
  }
  // Id of a token string as tokenizer files write it (added tokens, then the model vocabulary).
  std::optional<int32_t> lookup(std::string_view s) const { return token_to_id(s); }

 private:
  uint64_t instance_ = 0;
  PairMap merges_;
  std::array<int32_t, 256> byte_ids_{}, fallback_ids_{};
  int64_t vocab_size_ = 0;
  std::unordered_map<int32_t, size_t> added_by_id_;
  std::array<std::array<std::vector<size_t>, 256>, 2> by_first_;  // [normalized][first byte]

  static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
  static bool is_word_byte(unsigned char c) { return c >= 0x80 || std::isalnum(c) || c == '_'; }

  // Splits `s` on added tokens of one kind (normalized or not); calls text(piece, at_start) and
  // tok(id) in order.
  template <typename TextFn, typename TokFn>
  void split_added(std::string_view s, bool normalized, bool plain, bool at_start, TextFn&& text, TokFn&& tok) const {
    const auto& idx = by_first_[normalized ? 1 : 0];
    size_t last = 0, i = 0;
    bool any = false;
    for (auto& v : idx)
      if (!v.empty()) { any = true; break; }
    if (any) {
      while (i < s.size()) {
        const auto& cands = idx[static_cast<unsigned char>(s[i])];
        const Added* hit = nullptr;
        for (size_t c : cands) {
          const Added& a = added[c];
          if (plain && a.special) continue;
          if (s.compare(i, a.match.size(), a.match) != 0) continue;
          if (a.single_word) {
            size_t e = i + a.match.size();
            if ((i > 0 && is_word_byte(s[i - 1])) || (e < s.size() && is_word_byte(s[e]))) continue;
          }
          hit = &a;
          break;
        }
        if (!hit) {
          ++i;
          continue;
        }
        size_t b = i, e = i + hit->match.size();
        if (hit->lstrip)
          while (b > last && is_ws(s[b - 1])) --b;
        if (hit->rstrip)
          while (e < s.size() && is_ws(s[e])) ++e;
        if (b > last) text(s.substr(last, b - last), at_start && last == 0);
        tok(hit->id);
        last = i = e;
      }
    }
    if (last < s.size()) text(s.substr(last), at_start && last == 0);
  }

  std::vector<int32_t> encode_impl(std::string_view raw, bool add_special, bool parse_special) const {
    std::string clean;
    if (!is_valid_utf8(raw)) {
      clean = sanitize_utf8(raw);
      raw = clean;
    }
    std::vector<int32_t> out;
    out.reserve(raw.size() / 3 + 4);
    if (add_special) out = post_prefix;
    WordCache& cache = cache_for_thread();
    std::vector<Piece> pieces;
    auto on_normalized_text = [&](std::string_view s, bool at_start) {
      pieces.clear();
      pieces.push_back({std::string(s), at_start});
      pre_tokenize(pieces);
      for (auto& p : pieces) bpe_word(p.s, cache, out);
    };
    auto on_token = [&](int32_t id) { out.push_back(id); };
    split_added(raw, false, !parse_special, true, [&](std::string_view s, bool at_start) {
      if (normalizers.empty()) {
        split_added(s, true, !parse_special, at_start, on_normalized_text, on_token);
      } else {
        std::string n = normalize(s);
        split_added(n, true, !parse_special, at_start, on_normalized_text, on_token);
      }
    }, on_token);
    if (add_special) out.insert(out.end(), post_suffix.begin(), post_suffix.end());
    return out;
  }

  WordCache& cache_for_thread() const {
    thread_local std::array<WordCache, 4> slots;
    for (auto& s : slots)
      if (s.owner == instance_) return s;
    auto& s = slots[instance_ % slots.size()];
    s.owner = instance_;
    s.map.clear();
    return s;
  }

  std::string normalize(std::string_view s) const {
    std::string cur(s);
    for (const auto& n : normalizers) {
      switch (n.kind) {
        case NormStep::Unicode: {
          bool ascii = std::all_of(cur.begin(), cur.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
          if (ascii) break;
          UErrorCode st = U_ZERO_ERROR;
          if (n.norm->isNormalizedUTF8(icu::StringPiece(cur.data(), int32_t(cur.size())), st) && U_SUCCESS(st)) break;
          st = U_ZERO_ERROR;
          std::string o;
          icu::StringByteSink<std::string> sink(&o);
          n.norm->normalizeUTF8(0, icu::StringPiece(cur.data(), int32_t(cur.size())), sink, nullptr, st);
          if (U_FAILURE(st)) fail("unicode normalization failed: {}", u_errorName(st));
          cur = std::move(o);
          break;
        }
        case NormStep::Lowercase: {
          std::string o;
          for (size_t i = 0; i < cur.size();) {
            int len;
            char32_t c = u8decode(cur, i, &len);
            if (c == 0x130) o += "i\xCC\x87";  // full lowercase mapping of U+0130
            else u8append(o, char32_t(u_tolower(UChar32(c))));
            i += len;
          }
          cur = std::move(o);
          break;
        }
        case NormStep::Prepend:
          if (!cur.empty()) cur = n.a + cur;
          break;
        case NormStep::Replace:
          cur = replace_all(cur, n);
          break;
        case NormStep::Strip: {
          size_t b = 0, e = cur.size();
          if (n.left) b = strip_ws_left(cur);
          if (n.right) e = strip_ws_right(cur, b);
          cur = cur.substr(b, e - b);
          break;
        }
      }
    }
    return cur;
  }

  static size_t strip_ws_left(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
      int len;
      char32_t c = u8decode(s, i, &len);
      if (!u_isUWhiteSpace(UChar32(c))) break;
      i += len;
    }
    return i;
  }
  static size_t strip_ws_right(std::string_view s, size_t b) {
    size_t e = s.size();
    while (e > b) {
      size_t k = e - 1;
      while (k > b && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
      int len;
      char32_t c = u8decode(s, k, &len);
      if (!u_isUWhiteSpace(UChar32(c))) break;
      e = k;
    }
    return e;
  }

  static std::string replace_all(const std::string& s, const NormStep& n) { return replace_all(s, n.a, n.re, n.b); }
  static std::string replace_all(const std::string& s, const std::string& pat, const std::shared_ptr<Regex>& re,
                                 const std::string& content) {
    std::string o;
    if (re) {
      size_t last = 0;
      re->for_each_match(s, [&](size_t a, size_t b) {
        o.append(s, last, a - last);
        o += content;
        last = b;
      });
      o.append(s, last, std::string::npos);
      return o;
    }
    if (pat.empty()) return s;
    size_t last = 0, p;
    while ((p = s.find(pat, last)) != std::string::npos) {
      o.append(s, last, p - last);
      o += content;
      last = p + pat.size();
    }
    o.append(s, last, std::string::npos);
    return o;
  }

  // Splits one piece by a pattern with a behaviour (the semantics of tokenizers' split()).
  static void split_piece(const Piece& p, const PreStep& st, std::vector<Piece>& out) {
    struct M {
      size_t a, b;
      bool m;
    };
    std::vector<M> ms;
    size_t last = 0;
    st.re->for_each_match(p.s, [&](size_t a, size_t b) {
      if (a > last) ms.push_back({last, a, false});
      ms.push_back({a, b, true});
      last = b;
    });
    if (last < p.s.size()) ms.push_back({last, p.s.size(), false});
    if (st.invert)
      for (auto& m : ms) m.m = !m.m;
    std::vector<std::pair<size_t, size_t>> res;
    switch (st.behavior) {
      case Behavior::Isolated:
        for (auto& m : ms) res.push_back({m.a, m.b});
        break;
      case Behavior::Removed:
        for (auto& m : ms)
          if (!m.m) res.push_back({m.a, m.b});
        break;
      case Behavior::MergedWithPrevious: {
        bool prev = false;
        for (auto& m : ms) {
          if (m.m && !prev && !res.empty()) res.back().second = m.b;
          else res.push_back({m.a, m.b});
          prev = m.m;
        }
        break;
      }
      case Behavior::MergedWithNext: {
        bool prev = false;
        std::vector<std::pair<size_t, size_t>> rev;
        for (size_t k = ms.size(); k-- > 0;) {
          auto& m = ms[k];
          if (m.m && !prev && !rev.empty()) rev.back().first = m.a;
          else rev.push_back({m.a, m.b});
          prev = m.m;
        }
        res.assign(rev.rbegin(), rev.rend());
        break;
      }
      case Behavior::Contiguous: {
        bool prev = false;
        for (size_t k = 0; k < ms.size(); ++k) {
          auto& m = ms[k];
          if (k > 0 && m.m == prev) res.back().second = m.b;
          else res.push_back({m.a, m.b});
          prev = m.m;
        }
        break;
      }
    }
    for (auto& [a, b] : res)
      if (b > a) out.push_back({p.s.substr(a, b - a), p.at_start && a == 0});
  }

  void pre_tokenize(std::vector<Piece>& pieces) const {
    std::vector<Piece> next;
    for (const auto& st : pretok) {
      next.clear();
      for (auto& p : pieces) {
        switch (st.kind) {
          case PreStep::Split:
            split_piece(p, st, next);
            break;
          case PreStep::ByteLevel: {
            Piece q = std::move(p);
            if (st.add_prefix_space && (q.s.empty() || q.s[0] != ' ')) q.s.insert(q.s.begin(), ' ');
            if (st.re) split_piece(q, st, next);
            else next.push_back(std::move(q));
            break;
          }
          case PreStep::Metaspace: {
            Piece q{replace_all(p.s, " ", nullptr, st.replacement), p.at_start};
            bool pre = st.prepend == 0 || (st.prepend == 1 && p.at_start);
            if (pre && q.s.compare(0, st.replacement.size(), st.replacement) != 0) q.s = st.replacement + q.s;
            if (st.split) split_piece(q, st, next);
            else next.push_back(std::move(q));
            break;
          }
        }
      }
      pieces.swap(next);
    }
  }

  // BPE of one pre-token, appended to out.
  void bpe_word(const std::string& w, WordCache& cache, std::vector<int32_t>& out) const {
    if (w.empty()) return;
    const bool cacheable = w.size() < 256;
    if (cacheable) {
      auto it = cache.map.find(w);
      if (it != cache.map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    size_t start = out.size();
    bpe_uncached(w, out);
    if (cacheable) {
      if (cache.map.size() > 200000) cache.map.clear();
      cache.map.emplace(w, std::vector<int32_t>(out.begin() + start, out.end()));
    }
  }

  void bpe_uncached(const std::string& w, std::vector<int32_t>& out) const {
    if (ignore_merges) {
      auto it = token_ids.find(w);
      if (it != token_ids.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<int32_t> syms;
    syms.reserve(w.size());
    if (byte_level && prefix.empty() && suffix.empty()) {
      for (unsigned char b : w)
        if (byte_ids_[b] >= 0) syms.push_back(byte_ids_[b]);
        else if (unk) push_unk(syms);
    } else {
      std::string buf;
      for (size_t i = 0; i < w.size();) {
        int len = u8len(static_cast<unsigned char>(w[i]));
        if (byte_level) len = 1;
        buf.clear();
        if (i > 0) buf += prefix;
        buf.append(w, i, len);
        if (i + len >= w.size()) buf += suffix;
        auto it = token_ids.find(buf);
        if (it != token_ids.end()) {
          syms.push_back(it->second);
          unk_run_ = false;
        } else if (byte_fallback && std::all_of(w.begin() + i, w.begin() + i + len, [&](char c) {
                     return fallback_ids_[static_cast<unsigned char>(c)] >= 0;
                   })) {
          for (int k = 0; k < len; ++k) syms.push_back(fallback_ids_[static_cast<unsigned char>(w[i + k])]);
          unk_run_ = false;
        } else if (unk) {
          push_unk(syms);
        }
        i += len;
      }
    }
    unk_run_ = false;
    merge(syms);
    out.insert(out.end(), syms.begin(), syms.end());
  }

  void push_unk(std::vector<int32_t>& syms) const {
    if (fuse_unk && unk_run_ && !syms.empty() && syms.back() == *unk) return;
    syms.push_back(*unk);
    unk_run_ = true;
  }
  static thread_local bool unk_run_;

  void merge(std::vector<int32_t>& s) const {
    size_t n = s.size();
    if (n < 2) return;
    if (n <= 48) {
      uint32_t rk[48];
      int32_t nid[48];
      for (size_t i = 0; i + 1 < n; ++i) {
        auto* v = merges_.find(s[i], s[i + 1]);
        rk[i] = v ? v->rank : UINT32_MAX;
        nid[i] = v ? v->id : -1;
      }
      while (n > 1) {
        size_t best = 0;
        uint32_t br = rk[0];
        for (size_t i = 1; i + 1 < n; ++i)
          if (rk[i] < br) br = rk[i], best = i;
        if (br == UINT32_MAX) break;
        s[best] = nid[best];
        for (size_t i = best + 1; i + 1 < n; ++i) s[i] = s[i + 1];
        for (size_t i = best + 1; i + 2 < n; ++i) rk[i] = rk[i + 1], nid[i] = nid[i + 1];
        --n;
        auto upd = [&](size_t i) {
          auto* v = merges_.find(s[i], s[i + 1]);
          rk[i] = v ? v->rank : UINT32_MAX;
          nid[i] = v ? v->id : -1;
        };
        if (best > 0) upd(best - 1);
        if (best + 1 < n) upd(best);
      }
      s.resize(n);
      return;
    }
    // Long words: linked list + heap ordered by (rank, position); stale entries are skipped.
    std::vector<int32_t> prev(n), next(n);
    for (size_t i = 0; i < n; ++i) prev[i] = int32_t(i) - 1, next[i] = i + 1 < n ? int32_t(i + 1) : -1;
    struct E {
      uint32_t rank;
      int32_t pos, left, right;
      bool operator>(const E& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<E, std::vector<E>, std::greater<E>> pq;
    for (size_t i = 0; i + 1 < n; ++i)
      if (auto* v = merges_.find(s[i], s[i + 1])) pq.push({v->rank, int32_t(i), s[i], s[i + 1]});
    std::vector<char> dead(n, 0);
    while (!pq.empty()) {
      E e = pq.top();
      pq.pop();
      if (dead[e.pos] || s[e.pos] != e.left) continue;
      int32_t r = next[e.pos];
      if (r < 0 || s[r] != e.right) continue;
      auto* v = merges_.find(e.left, e.right);
      s[e.pos] = v->id;
      dead[r] = 1;
      next[e.pos] = next[r];
      if (next[r] >= 0) prev[next[r]] = e.pos;
      if (prev[e.pos] >= 0)
        if (auto* w = merges_.find(s[prev[e.pos]], s[e.pos])) pq.push({w->rank, prev[e.pos], s[prev[e.pos]], s[e.pos]});
      if (next[e.pos] >= 0)
        if (auto* w = merges_.find(s[e.pos], s[next[e.pos]])) pq.push({w->rank, e.pos, s[e.pos], s[next[e.pos]]});
    }
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) s[k++] = s[i];
    s.resize(k);
  }

  void apply_decoder(const DecStep& d, std::vector<std::string>& toks) const {
    switch (d.kind) {
      case DecStep::ByteLevel: {
        std::string all;
        for (auto& t : toks) {
          auto raw = unmap_bytes(t);
          all += raw ? *raw : t;
        }
        toks.assign(1, sanitize_utf8(all));
        break;
      }
      case DecStep::Metaspace:
        for (size_t i = 0; i < toks.size(); ++i) {
          std::string t = replace_all(toks[i], d.a, nullptr, " ");
          if (i == 0 && d.prepend && !t.empty() && t[0] == ' ') t.erase(0, 1);
          toks[i] = std::move(t);
        }
        break;
      case DecStep::ByteFallback: {
        std::vector<std::string> o;
        std::string bytes;
        auto flush = [&] {
          if (bytes.empty()) return;
          if (is_valid_utf8(bytes)) o.push_back(bytes);
          else
            for (size_t k = 0; k < bytes.size(); ++k) o.push_back("\xEF\xBF\xBD");
          bytes.clear();
        };
        for (auto& t : toks) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4]))) {
            bytes += char(std::stoi(t.substr(3, 2), nullptr, 16));
          } else {
            flush();
            o.push_back(t);
          }
        }
        flush();
        toks.swap(o);
        break;
      }
      case DecStep::Fuse: {
        std::string all;
        for (auto& t : toks) all += t;
        toks.assign(1, all);
        break;
      }
      case DecStep::Strip:
        for (auto& t : toks) {
          size_t b = 0, e = t.size();
          for (int k = 0; k < d.start && t.compare(b, d.a.size(), d.a) == 0 && b < e; ++k) b += d.a.size();
          for (int k = 0; k < d.stop && e >= b + d.a.size() && t.compare(e - d.a.size(), d.a.size(), d.a) == 0; ++k)
            e -= d.a.size();
          t = t.substr(b, e - b);
        }
        break;
      case DecStep::Replace:
        for (auto& t : toks) t = replace_all(t, d.a, d.re, d.b);
        break;
    }
  }
};
thread_local bool BpeTokenizer::unk_run_ = false;

// ---- tokenizer.json parsing ----
std::string jpath_type(const json& j, const std::string& path) {
  if (!j.is_object()) fail("{}: expected an object", path);
  if (!j.contains("type") || !j["type"].is_string()) fail("{}: missing \"type\"", path);
  return j["type"].get<std::string>();
}
template <typename T>
T jget(const json& j, const char* key, T def) {
  if (!j.contains(key) || j[key].is_null()) return def;
  return j[key].get<T>();
}

// {"String": s} or {"Regex": r}: a Regex (a literal string is escaped).
std::shared_ptr<Regex> pattern_regex(const json& p, const std::string& path, std::string* literal = nullptr) {
  if (p.is_object() && p.contains("Regex")) return std::make_shared<Regex>(p["Regex"].get<std::string>(), path);
  if (p.is_object() && p.contains("String")) {
    std::string s = p["String"].get<std::string>();
    if (literal) {
      *literal = s;
      return nullptr;
    }
    return std::make_shared<Regex>("\\Q" + s + "\\E", path);
  }
  fail("{}: pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}", path);
}

Behavior parse_behavior(const std::string& s, const std::string& path) {
  if (s == "Removed") return Behavior::Removed;
  if (s == "Isolated") return Behavior::Isolated;
  if (s == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (s == "MergedWithNext") return Behavior::MergedWithNext;
  if (s == "Contiguous") return Behavior::Contiguous;
  fail("{}: unknown split behavior \"{}\"", path, s);
}

const icu::Normalizer2* icu_norm(const std::string& form) {
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* n = form == "NFC"    ? icu::Normalizer2::getNFCInstance(st)
                              : form == "NFD"  ? icu::Normalizer2::getNFDInstance(st)
                              : form == "NFKC" ? icu::Normalizer2::getNFKCInstance(st)
                                               : icu::Normalizer2::getNFKDInstance(st);
  if (U_FAILURE(st)) fail("ICU {} normalizer unavailable: {}", form, u_errorName(st));
  return n;
}

void parse_normalizer(const json& j, const std::string& path, std::vector<NormStep>& out) {
  if (j.is_null()) return;
  std::string t = jpath_type(j, path);
  if (t == "Sequence") {
    const auto& list = j.at("normalizers");
    for (size_t i = 0; i < list.size(); ++i) parse_normalizer(list[i], fmt::format("{}.normalizers[{}]", path, i), out);
  } else if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
    NormStep s{NormStep::Unicode};
    s.norm = icu_norm(t);
    s.a = t;
    out.push_back(s);
  } else if (t == "Lowercase") {
    out.push_back({NormStep::Lowercase});
  } else if (t == "Prepend") {
    NormStep s{NormStep::Prepend};
    s.a = j.at("prepend").get<std::string>();
    out.push_back(s);
  } else if (t == "Replace") {
    NormStep s{NormStep::Replace};
    s.re = pattern_regex(j.at("pattern"), path + ".pattern", &s.a);
    s.b = j.at("content").get<std::string>();
    out.push_back(s);
  } else if (t == "Strip") {
    NormStep s{NormStep::Strip};
    s.left = jget(j, "strip_left", true);
    s.right = jget(j, "strip_right", true);
    out.push_back(s);
  } else {
    fail("{}: unsupported normalizer type \"{}\"", path, t);
  }
}

int parse_prepend_scheme(const json& j) {
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
    auto s = j["prepend_scheme"].get<std::string>();
    return s == "always" ? 0 : s == "first" ? 1 : 2;
  }
  return jget(j, "add_prefix_space", true) ? 0 : 2;
}

void parse_pretok(const json& j, const std::string& path, std::vector<PreStep>& out) {
  if (j.is_null()) return;
  std::string t = jpath_type(j, path);
  if (!out.empty() && out.back().kind == PreStep::ByteLevel && t != "Sequence")
    fail("{}: pre-tokenizer \"{}\" after ByteLevel is not supported", path, t);
  if (t == "Sequence") {
    const auto& list = j.at("pretokenizers");
    for (size_t i = 0; i < list.size(); ++i) parse_pretok(list[i], fmt::format("{}.pretokenizers[{}]", path, i), out);
  } else if (t == "Split") {
    PreStep s{PreStep::Split};
    s.re = pattern_regex(j.at("pattern"), path + ".pattern");
    s.behavior = parse_behavior(j.at("behavior").get<std::string>(), path + ".behavior");
    s.invert = jget(j, "invert", false);
    out.push_back(s);
  } else if (t == "ByteLevel") {
    PreStep s{PreStep::ByteLevel};
    s.add_prefix_space = jget(j, "add_prefix_space", true);
    if (jget(j, "use_regex", true)) s.re = std::make_shared<Regex>(kGpt2Pattern, path);
    out.push_back(s);
  } else if (t == "Metaspace") {
    PreStep s{PreStep::Metaspace};
    s.replacement = jget<std::string>(j, "replacement", "\xE2\x96\x81");
    s.prepend = parse_prepend_scheme(j);
    s.split = jget(j, "split", true);
    s.re = std::make_shared<Regex>("\\Q" + s.replacement + "\\E", path);
    s.behavior = Behavior::MergedWithNext;
    out.push_back(s);
  } else if (t == "Digits") {
    PreStep s{PreStep::Split};
    s.re = std::make_shared<Regex>("[0-9]", path);
    s.behavior = jget(j, "individual_digits", false) ? Behavior::Isolated : Behavior::Contiguous;
    out.push_back(s);
  } else if (t == "Whitespace") {
    PreStep s{PreStep::Split};
    s.re = std::make_shared<Regex>(R"(\w+|[^\w\s]+)", path);
    s.behavior = Behavior::Removed;
    s.invert = true;
    out.push_back(s);
  } else if (t == "WhitespaceSplit") {
    PreStep s{PreStep::Split};
    s.re = std::make_shared<Regex>(R"(\s+)", path);
    s.behavior = Behavior::Removed;
    out.push_back(s);
  } else {
    fail("{}: unsupported pre-tokenizer type \"{}\"", path, t);
  }
}

void parse_decoder(const json& j, const std::string& path, std::vector<DecStep>& out) {
  if (j.is_null()) return;
  std::string t = jpath_type(j, path);
  if (t == "Sequence") {
    const auto& list = j.at("decoders");
    for (size_t i = 0; i < list.size(); ++i) parse_decoder(list[i], fmt::format("{}.decoders[{}]", path, i), out);
  } else if (t == "ByteLevel") {
    out.push_back({DecStep::ByteLevel});
  } else if (t == "Metaspace") {
    DecStep d{DecStep::Metaspace};
    d.a = jget<std::string>(j, "replacement", "\xE2\x96\x81");
    d.prepend = parse_prepend_scheme(j) != 2;
    out.push_back(d);
  } else if (t == "ByteFallback") {
    out.push_back({DecStep::ByteFallback});
  } else if (t == "Fuse") {
    out.push_back({DecStep::Fuse});
  } else if (t == "Strip") {
    DecStep d{DecStep::Strip};
    d.a = j.at("content").get<std::string>();
    d.start = jget(j, "start", 0);
    d.stop = jget(j, "stop", 0);
    out.push_back(d);
  } else if (t == "Replace") {
    DecStep d{DecStep::Replace};
    d.re = pattern_regex(j.at("pattern"), path + ".pattern", &d.a);
    d.b = j.at("content").get<std::string>();
    out.push_back(d);
  } else {
    fail("{}: unsupported decoder type \"{}\"", path, t);
  }
}

void parse_post(const json& j, const std::string& path, BpeTokenizer& tk) {
  if (j.is_null()) return;
  std::string t = jpath_type(j, path);
  auto id_of = [&](const json& tokpair, const std::string& where) -> int32_t {
    // ["<s>", 1]
    if (!tokpair.is_array() || tokpair.size() != 2) fail("{}: expected [token, id]", where);
    return tokpair[1].get<int32_t>();
  };
  if (t == "Sequence") {
    const auto& list = j.at("processors");
    for (size_t i = 0; i < list.size(); ++i) parse_post(list[i], fmt::format("{}.processors[{}]", path, i), tk);
  } else if (t == "ByteLevel") {
    // offsets only
  } else if (t == "TemplateProcessing") {
    const auto& single = j.at("single");
    const auto& specials = j.contains("special_tokens") ? j["special_tokens"] : json::object();
    std::vector<int32_t> pre, suf;
    bool seen_seq = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const auto& item = single[i];
      if (item.contains("Sequence")) {
        seen_seq = true;
      } else if (item.contains("SpecialToken")) {
        std::string name = item["SpecialToken"].at("id").get<std::string>();
        if (!specials.contains(name))
          fail("{}.single[{}]: special token \"{}\" is not in special_tokens", path, i, name);
        for (const auto& id : specials[name].at("ids")) (seen_seq ? suf : pre).push_back(id.get<int32_t>());
      } else {
        fail("{}.single[{}]: expected SpecialToken or Sequence", path, i);
      }
    }
    tk.post_prefix.insert(tk.post_prefix.begin(), pre.begin(), pre.end());
    tk.post_suffix.insert(tk.post_suffix.end(), suf.begin(), suf.end());
  } else if (t == "RobertaProcessing" || t == "BertProcessing") {
    tk.post_prefix.insert(tk.post_prefix.begin(), id_of(j.at("cls"), path + ".cls"));
    tk.post_suffix.push_back(id_of(j.at("sep"), path + ".sep"));
  } else {
    fail("{}: unsupported post-processor type \"{}\"", path, t);
  }
}

// A string-form merge "a b". Tokens may contain spaces (Llama-2's "   " = " " + " "): then the
// split whose halves and concatenation are all in the vocabulary, which must be unique.
std::pair<std::string, std::string> split_merge_string(const std::string& m,
                                                       const std::unordered_map<std::string, int32_t>& v,
                                                       const std::string& where) {
  size_t sp = m.find(' ');
  if (sp != std::string::npos && m.find(' ', sp + 1) == std::string::npos)
    return {m.substr(0, sp), m.substr(sp + 1)};
  std::vector<std::pair<std::string, std::string>> cands;
  for (size_t i = 1; i + 1 < m.size(); ++i) {
    if (m[i] != ' ') continue;
    std::string a = m.substr(0, i), b = m.substr(i + 1);
    if (v.count(a) && v.count(b) && v.count(a + b)) cands.push_back({a, b});
  }
  if (cands.size() == 1) return cands[0];
  if (sp == std::string::npos) fail("{}: merge \"{}\" has no space between its two tokens", where, m);
  fail("{}: merge \"{}\" is ambiguous ({} ways to split it into vocabulary tokens)", where, m, cands.size());
}

void build_merges(BpeTokenizer& tk, const std::unordered_map<std::string, int32_t>& raw_vocab,
                  const std::vector<std::pair<std::string, std::string>>& merges,
                  const std::function<std::string(size_t)>& where) {
  auto id = [&](const std::string& s, size_t i) -> int32_t {
    auto it = raw_vocab.find(s);
    if (it == raw_vocab.end()) fail("{}: merge token \"{}\" is not in the vocabulary", where(i), s);
    return it->second;
  };
  tk.merge_list.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const auto& [a, b] = merges[i];
    int32_t ia = id(a, i), ib = id(b, i);
    std::string ab = a + b;
    if (!tk.prefix.empty() && ab.compare(0, 0, "") == 0 && b.compare(0, tk.prefix.size(), tk.prefix) == 0)
      ab = a + b.substr(tk.prefix.size());
    auto it = raw_vocab.find(ab);
    if (it == raw_vocab.end()) fail("{}: merged token \"{}\" is not in the vocabulary", where(i), ab);
    tk.merge_list.emplace_back(ia, ib, uint32_t(i), it->second);
  }
}

// Vocabulary from {token: id} (token strings as written); raw bytes when byte-level.
void set_vocab(BpeTokenizer& tk, const json& v, const std::string& where) {
  if (!v.is_object()) fail("{}: expected an object {{token: id}}", where);
  int32_t maxid = -1;
  for (auto it = v.begin(); it != v.end(); ++it) maxid = std::max(maxid, it.value().get<int32_t>());
  tk.vocab.assign(size_t(maxid + 1), std::string());
  tk.token_ids.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    int32_t id = it.value().get<int32_t>();
    if (id < 0) fail("{}: token \"{}\" has a negative id", where, it.key());
    std::string s = it.key();
    if (tk.byte_level)
      if (auto raw = unmap_bytes(s)) s = *raw;
    tk.vocab[id] = s;
    tk.token_ids[s] = id;
  }
}

void apply_config_bos_eos(BpeTokenizer& tk, const TokenizerConfig& cfg, const std::string& where) {
  auto resolve = [&](const std::optional<std::string>& name) -> std::optional<int32_t> {
    if (!name) return std::nullopt;
    auto id = tk.lookup(*name);
    if (!id) fail("{}: tokenizer_config.json names token \"{}\", which is not in the vocabulary", where, *name);
    return id;
  };
  auto b = resolve(cfg.bos_token), e = resolve(cfg.eos_token);
  if (b) tk.bos_ = b;
  if (e) tk.eos_ = e;
  if (!tk.bos_ && !tk.post_prefix.empty()) tk.bos_ = tk.post_prefix.front();
  if (!tk.eos_ && !tk.post_suffix.empty()) tk.eos_ = tk.post_suffix.back();
  // Explicit add_bos_token / add_eos_token (transformers' Llama tokenizers) replace the template.
  if (cfg.add_bos_token || cfg.add_eos_token) {
    bool ab = cfg.add_bos_token.value_or(!tk.post_prefix.empty());
    bool ae = cfg.add_eos_token.value_or(!tk.post_suffix.empty());
    if (ab && !tk.bos_) fail("{}: add_bos_token is set but no bos_token is known", where);
    if (ae && !tk.eos_) fail("{}: add_eos_token is set but no eos_token is known", where);
    tk.post_prefix.clear();
    tk.post_suffix.clear();
    if (ab) tk.post_prefix.push_back(*tk.bos_);
    if (ae) tk.post_suffix.push_back(*tk.eos_);
  }
  tk.adds_bos_ = tk.bos_ && !tk.post_prefix.empty() && tk.post_prefix.front() == *tk.bos_;
}

std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail("cannot open {}", p.string());
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json parse_json_file(const std::filesystem::path& p) {
  std::string s = read_file(p);
  try {
    return json::parse(s);
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", p.string(), e.what());
  }
}

void add_config_added_tokens(BpeTokenizer& tk, const TokenizerConfig& cfg) {
  if (!cfg.added_tokens_decoder.is_object()) return;
  for (auto it = cfg.added_tokens_decoder.begin(); it != cfg.added_tokens_decoder.end(); ++it) {
    const auto& a = it.value();
    int32_t id = std::stoi(it.key());
    bool dup = false;
    for (auto& x : tk.added) dup |= x.id == id;
    if (dup) continue;
    tk.added.push_back({a.at("content").get<std::string>(), id, jget(a, "special", true), jget(a, "lstrip", false),
                        jget(a, "rstrip", false), jget(a, "single_word", false), jget(a, "normalized", false)});
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_json(const std::filesystem::path& file, const TokenizerConfig& cfg) {
  return with_context(file.string(), [&]() -> std::unique_ptr<Tokenizer> {
    json j = parse_json_file(file);
    if (!j.is_object()) fail("expected a JSON object");
    if (!j.contains("model") || !j["model"].is_object()) fail("missing \"model\"");
    auto tk = std::make_unique<BpeTokenizer>();
    try {
      const json& m = j["model"];
      std::string mtype = jget<std::string>(m, "type", m.contains("merges") ? "BPE" : "");
      if (mtype != "BPE") fail("model: unsupported model type \"{}\" (only BPE)", mtype);
      parse_pretok(j.value("pre_tokenizer", json()), "pre_tokenizer", tk->pretok);
      for (auto& p : tk->pretok) tk->byte_level |= p.kind == PreStep::ByteLevel;
      parse_normalizer(j.value("normalizer", json()), "normalizer", tk->normalizers);
      parse_decoder(j.value("decoder", json()), "decoder", tk->decoders);
      if (!m.contains("vocab")) fail("model: missing \"vocab\"");
      set_vocab(*tk, m["vocab"], "model.vocab");
      tk->ignore_merges = jget(m, "ignore_merges", false);
      tk->byte_fallback = jget(m, "byte_fallback", false);
      tk->fuse_unk = jget(m, "fuse_unk", false);
      tk->prefix = jget<std::string>(m, "continuing_subword_prefix", "");
      tk->suffix = jget<std::string>(m, "end_of_word_suffix", "");
      if (tk->byte_level && (!tk->prefix.empty() || !tk->suffix.empty()))
        fail("model: continuing_subword_prefix / end_of_word_suffix with a byte-level pre-tokenizer is not supported");
      if (m.contains("unk_token") && m["unk_token"].is_string()) {
        auto u = m["unk_token"].get<std::string>();
        auto it = tk->token_ids.find(u);
        if (it == tk->token_ids.end()) fail("model.unk_token: \"{}\" is not in the vocabulary", u);
        tk->unk = it->second;
      }
      std::vector<std::pair<std::string, std::string>> merges;
      const json& mj = m.contains("merges") ? m["merges"] : json::array();
      merges.reserve(mj.size());
      // Merge strings as written -> raw vocab keys.
      std::unordered_map<std::string, int32_t> written;
      const std::unordered_map<std::string, int32_t>* vref = &tk->token_ids;
      if (tk->byte_level) {
        for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) written[it.key()] = it.value().get<int32_t>();
        vref = &written;
      }
      for (size_t i = 0; i < mj.size(); ++i) {
        if (mj[i].is_string()) merges.push_back(split_merge_string(mj[i].get<std::string>(), *vref, fmt::format("model.merges[{}]", i)));
        else if (mj[i].is_array() && mj[i].size() == 2) merges.push_back({mj[i][0].get<std::string>(), mj[i][1].get<std::string>()});
        else fail("model.merges[{}]: expected \"a b\" or [a, b]", i);
      }
      build_merges(*tk, *vref, merges, [](size_t i) { return fmt::format("model.merges[{}]", i); });
      if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
        const auto& at = j["added_tokens"];
        for (size_t i = 0; i < at.size(); ++i) {
          const auto& a = at[i];
          if (!a.contains("id") || !a.contains("content")) fail("added_tokens[{}]: needs id and content", i);
          tk->added.push_back({a["content"].get<std::string>(), a["id"].get<int32_t>(), jget(a, "special", false),
                               jget(a, "lstrip", false), jget(a, "rstrip", false), jget(a, "single_word", false),
                               jget(a, "normalized", !jget(a, "special", false))});
        }
      }
      parse_post(j.value("post_processor", json()), "post_processor", *tk);
    } catch (const json::exception& e) {
      fail("malformed tokenizer.json: {}", e.what());
    }
    apply_config_bos_eos(*tk, cfg, file.string());
    tk->description = fmt::format("bpe ({}, {}{} tokens)", file.filename().string(),
                                  tk->byte_level ? "byte-level, " : "", tk->vocab.size() + 0);
    tk->finish();
    return tk;
  });
}

std::unique_ptr<Tokenizer> load_bpe_pair(const std::filesystem::path& vocab_file, const std::filesystem::path& merges_file,
                                         const TokenizerConfig& cfg) {
  auto tk = std::make_unique<BpeTokenizer>();
  tk->byte_level = true;
  json v = parse_json_file(vocab_file);
  with_context(vocab_file.string(), [&] { set_vocab(*tk, v, "vocabulary"); });
  std::unordered_map<std::string, int32_t> written;
  for (auto it = v.begin(); it != v.end(); ++it) written[it.key()] = it.value().get<int32_t>();
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<size_t> linenos;
  {
    std::string text = read_file(merges_file);
    std::istringstream in(text);
    std::string line;
    size_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.rfind("#version", 0) == 0) continue;
      merges.push_back(split_merge_string(line, written, fmt::format("{}:{}", merges_file.string(), lineno)));
      linenos.push_back(lineno);
    }
  }
  build_merges(*tk, written, merges, [&](size_t i) { return fmt::format("{}:{}", merges_file.string(), linenos[i]); });
  bool llama3 = tk->vocab.size() == 128000;
  if (cfg.added_tokens_decoder.is_object())
    for (auto it = cfg.added_tokens_decoder.begin(); it != cfg.added_tokens_decoder.end(); ++it)
      llama3 |= it.value().value("content", "") == "<|begin_of_text|>";
  PreStep ps{PreStep::Split};
  if (llama3) {
    ps.re = std::make_shared<Regex>(kLlama3Pattern, "llama-3 pattern");
    tk->pretok.push_back(ps);
    tk->pretok.push_back({PreStep::ByteLevel});
    tk->ignore_merges = true;
  } else {
    PreStep bl{PreStep::ByteLevel};
    bl.re = std::make_shared<Regex>(kGpt2Pattern, "gpt-2 pattern");
    tk->pretok.push_back(bl);
  }
  tk->decoders.push_back({DecStep::ByteLevel});
  add_config_added_tokens(*tk, cfg);
  if (!cfg.added_tokens_decoder.is_object()) {
    if (auto id = tk->lookup("<|endoftext|>")) tk->added.push_back({"<|endoftext|>", *id, true, false, false, false, true});
  }
  if (llama3) {
    auto b = tk->lookup("<|begin_of_text|>");
    if (b) tk->post_prefix.push_back(*b);  // Meta's tokenizer.json template: <|begin_of_text|> $A
  }
  apply_config_bos_eos(*tk, cfg, vocab_file.string());
  tk->description = fmt::format("bpe ({} + {}, byte-level, {} pattern, {} tokens)", vocab_file.filename().string(),
                                merges_file.filename().string(), llama3 ? "llama-3" : "gpt-2", tk->vocab.size());
  tk->finish();
  return tk;
}

std::unique_ptr<Tokenizer> load_tiktoken(const std::filesystem::path& file, const TokenizerConfig& cfg) {
  auto tk = std::make_unique<BpeTokenizer>();
  tk->byte_level = true;
  std::string text = read_file(file);
  static const std::string b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::array<int, 256> dec;
  dec.fill(-1);
  for (int i = 0; i < 64; ++i) dec[static_cast<unsigned char>(b64[i])] = i;
  std::istringstream in(text);
  std::string line;
  size_t lineno = 0;
  std::vector<std::pair<std::string, int32_t>> entries;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    if (sp == std::string::npos) fail("{}:{}: expected \"<base64 token> <rank>\"", file.string(), lineno);
    std::string tok;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < sp; ++i) {
      char c = line[i];
      if (c == '=') break;
      int d = dec[static_cast<unsigned char>(c)];
      if (d < 0) fail("{}:{}: invalid base64 character '{}'", file.string(), lineno, c);
      acc = (acc << 6) | uint32_t(d);
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        tok += char((acc >> bits) & 0xFF);
      }
    }
    int32_t rank;
    try {
      rank = std::stoi(line.substr(sp + 1));
    } catch (...) {
      fail("{}:{}: invalid rank \"{}\"", file.string(), lineno, line.substr(sp + 1));
    }
    if (rank < 0) fail("{}:{}: negative rank", file.string(), lineno);
    entries.push_back({tok, rank});
  }
  if (entries.empty()) fail("{}: no tokens", file.string());
  int32_t maxr = 0;
  for (auto& e : entries) maxr = std::max(maxr, e.second);
  tk->vocab.assign(size_t(maxr) + 1, std::string());
  for (auto& [t, r] : entries) {
    tk->vocab[r] = t;
    tk->token_ids[t] = r;
  }
  for (int b = 0; b < 256; ++b)
    if (!tk->token_ids.count(std::string(1, char(b))))
      fail("{}: byte 0x{:02X} has no token (a tiktoken file must rank all 256 bytes)", file.string(), b);
  // tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first.
  for (auto& [t, r] : entries)
    for (size_t k = 1; k < t.size(); ++k) {
      auto a = tk->token_ids.find(t.substr(0, k));
      if (a == tk->token_ids.end()) continue;
      auto b = tk->token_ids.find(t.substr(k));
      if (b == tk->token_ids.end()) continue;
      tk->merge_list.emplace_back(a->second, b->second, uint32_t(r), r);
    }
  tk->ignore_merges = true;
  NormStep nfc{NormStep::Unicode};
  nfc.norm = icu_norm("NFC");
  nfc.a = "NFC";
  tk->normalizers.push_back(nfc);  // Qwen's tokenizer NFC-normalizes the text first
  PreStep ps{PreStep::Split};
  ps.re = std::make_shared<Regex>(kQwenPattern, "qwen pattern");
  tk->pretok.push_back(ps);
  tk->pretok.push_back({PreStep::ByteLevel});
  tk->decoders.push_back({DecStep::ByteLevel});
  std::vector<std::string> specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  for (int i = 0; i < 205; ++i) specials.push_back(fmt::format("<|extra_{}|>", i));
  int32_t next = int32_t(tk->vocab.size());
  for (auto& s : specials) tk->added.push_back({s, next++, true, false, false, false, true});
  TokenizerConfig c = cfg;
  if (!c.eos_token) c.eos_token = "<|endoftext|>";
  apply_config_bos_eos(*tk, c, file.string());
  tk->description = fmt::format("bpe ({}, tiktoken ranks, qwen pattern, {} tokens)", file.filename().string(),
                                tk->vocab.size());
  tk->finish();
  return tk;
}

}  // namespace calq::text::detail
