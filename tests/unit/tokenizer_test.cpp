// Tokenizers: exactness against fixtures made by the reference implementations
// (scripts/fixtures/make_tokenizer_fixtures.py), llama.cpp's tokenizer test vectors, round trips on
// random input, invalid UTF-8 and errors for malformed files.
#include "calq/text/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <random>
#include <sstream>

#include "calq/core/error.h"
#include "support.h"

namespace {

namespace fs = std::filesystem;
using calq::text::load_tokenizer;
using calq::text::Tokenizer;
using calq_test::shared_file;
using nlohmann::json;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<std::string> corpus() {
  std::vector<std::string> out;
  std::ifstream f(calq_test::source_dir() / "tests/data/tokenizer/corpus.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = json::parse(line);
    if (j.contains("text")) {
      out.push_back(j["text"].get<std::string>());
    } else {
      std::string hex = j["hex"].get<std::string>(), raw;
      for (size_t i = 0; i < hex.size(); i += 2) raw += char(std::stoi(hex.substr(i, 2), nullptr, 16));
      out.push_back(raw);
    }
  }
  return out;
}

struct FixtureCase {
  const char* fixture;
  const char* tokenizer;  // under ../shared/data
};
const FixtureCase kFixtures[] = {
    {"qwen3-json", "models/bench-qwen3-16m"},
    {"gpt2-json", "tokenizers/gpt2"},
    {"gpt2-pair", "tokenizers/gpt2/vocab.json"},
    {"llama2-json", "tokenizers/llama2/tokenizer.json"},
    {"llama2-model", "tokenizers/llama2/tokenizer.model"},
    {"llama3.2-pair", "tokenizers/llama3.2"},
    {"qwen-tiktoken", "tokenizers/qwen"},
};

class Fixture : public ::testing::TestWithParam<FixtureCase> {};

TEST_P(Fixture, MatchesReference) {
  auto path = shared_file(std::string("data/") + GetParam().tokenizer);
  if (path.empty()) GTEST_SKIP() << "no " << GetParam().tokenizer;
  auto tok = load_tokenizer(path);
  auto fx = json::parse(slurp(calq_test::source_dir() / "tests/data/tokenizer/expected" /
                              (std::string(GetParam().fixture) + ".json")));
  auto texts = corpus();
  const auto& cases = fx["cases"];
  ASSERT_EQ(cases.size(), texts.size());
  size_t ok_ids = 0, ok_special = 0, n_special = 0, ok_decode = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    auto want = cases[i]["ids"].get<std::vector<int32_t>>();
    auto got = tok->encode(texts[i]);
    if (got == want) ++ok_ids;
    else ADD_FAILURE() << GetParam().fixture << " case " << i << ": ids differ (" << got.size() << " vs " << want.size()
                       << ")";
    if (cases[i].contains("ids_special")) {
      ++n_special;
      auto ws = cases[i]["ids_special"].get<std::vector<int32_t>>();
      if (tok->encode(texts[i], true) == ws) ++ok_special;
      else ADD_FAILURE() << GetParam().fixture << " case " << i << ": ids with special tokens differ";
    }
    auto dec = tok->decode(want);
    if (dec == cases[i]["decoded"].get<std::string>()) ++ok_decode;
    else ADD_FAILURE() << GetParam().fixture << " case " << i << ": decode differs: " << dec;
    EXPECT_EQ(tok->encode_parallel(texts[i], true, 4), tok->encode(texts[i], true)) << "case " << i;
  }
  std::printf("%s (%s): ids %zu/%zu, with special tokens %zu/%zu, decode %zu/%zu\n", GetParam().fixture,
              fx["reference"].get<std::string>().c_str(), ok_ids, texts.size(), ok_special, n_special, ok_decode,
              texts.size());
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, Fixture, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) {
                           std::string s = info.param.fixture;
                           for (auto& c : s)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return s;
                         });

// llama.cpp's tests/test-tokenizer-0: inputs separated by "\n__ggml_vocab_test__\n", expected ids
// per line; tokenized without BOS and without parsing special tokens (parse_special = false).
struct VocabCase {
  const char* vocab;
  const char* tokenizer;
};
const VocabCase kVocabs[] = {
    {"gpt-2", "tokenizers/gpt2"},
    {"llama-spm", "tokenizers/llama2/tokenizer.model"},
    {"llama-bpe", "tokenizers/llama3.2"},
    // Qwen2's vocabulary is Qwen(-1)'s 151,643 ranks; bench-qwen3-16m has its own 8,192-token
    // vocabulary, so llama.cpp's qwen2 ids (up to ~150k) are matched with the Qwen ranks file.
    {"qwen2", "tokenizers/qwen"},
};
class LlamaCppVocab : public ::testing::TestWithParam<VocabCase> {};

TEST_P(LlamaCppVocab, MatchesTestVectors) {
  auto inp = shared_file(std::string("data/llama.cpp-vocab/ggml-vocab-") + GetParam().vocab + ".gguf.inp");
  auto outp = shared_file(std::string("data/llama.cpp-vocab/ggml-vocab-") + GetParam().vocab + ".gguf.out");
  auto path = shared_file(std::string("data/") + GetParam().tokenizer);
  if (inp.empty() || outp.empty() || path.empty()) GTEST_SKIP() << "test vectors or tokenizer absent";
  auto tok = load_tokenizer(path);
  std::string all = slurp(inp);
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> inputs;
  for (size_t pos = 0;;) {
    size_t e = all.find(sep, pos);
    if (e == std::string::npos) break;
    inputs.push_back(all.substr(pos, e - pos));
    pos = e + sep.size();
  }
  std::ifstream f(outp);
  std::string line;
  size_t i = 0, ok = 0;
  while (std::getline(f, line) && i < inputs.size()) {
    std::vector<int32_t> want;
    std::istringstream ls(line);
    int32_t id;
    while (ls >> id) want.push_back(id);
    auto got = tok->encode_plain(inputs[i]);
    if (got == want) ++ok;
    else ADD_FAILURE() << GetParam().vocab << " input " << i << " differs";
    ++i;
  }
  EXPECT_EQ(i, inputs.size());
  std::printf("llama.cpp %s: %zu/%zu\n", GetParam().vocab, ok, inputs.size());
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, LlamaCppVocab, ::testing::ValuesIn(kVocabs), [](const auto& info) {
  std::string s = std::string(info.param.vocab) + "_" + info.param.tokenizer;
  for (auto& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
});

TEST(Utf8, ReplacesMaximalSubparts) {
  using calq::text::sanitize_utf8;
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(sanitize_utf8("abc"), "abc");
  EXPECT_EQ(sanitize_utf8("\xff"), R);
  EXPECT_EQ(sanitize_utf8("\xe2\x82"), R);              // truncated 3-byte sequence: one
  EXPECT_EQ(sanitize_utf8("\xe2\x82 x"), R + " x");
  EXPECT_EQ(sanitize_utf8("\xf0\x9f\x98"), R);          // truncated emoji: one
  EXPECT_EQ(sanitize_utf8("\xed\xa0\x80"), R + R + R);  // surrogate: each byte
  EXPECT_EQ(sanitize_utf8("\xc0\xaf"), R + R);          // overlong
  EXPECT_EQ(sanitize_utf8("\xf4\x90\x80\x80"), R + R + R + R);
  EXPECT_EQ(sanitize_utf8("\xc3\x28"), R + "(");
  EXPECT_EQ(sanitize_utf8("\xe2\x82\xac"), "\xe2\x82\xac");
  EXPECT_TRUE(calq::text::is_valid_utf8("\xf0\x9f\x98\x80"));
  EXPECT_FALSE(calq::text::is_valid_utf8("\x80"));
}

std::string random_bytes(std::mt19937& rng, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += char(rng() & 0xFF);
  return s;
}
std::string random_unicode(std::mt19937& rng, size_t n) {
  static const uint32_t ranges[][2] = {{0x20, 0x7E}, {0x09, 0x0D}, {0xA0, 0x24F}, {0x300, 0x36F}, {0x370, 0x3FF},
                                       {0x400, 0x4FF}, {0x590, 0x6FF}, {0x900, 0x97F}, {0xE00, 0xE7F}, {0x1100, 0x11FF},
                                       {0x2000, 0x206F}, {0x3040, 0x30FF}, {0x4E00, 0x4FFF}, {0xAC00, 0xAD00},
                                       {0xFE00, 0xFE0F}, {0x1F300, 0x1F6FF}, {0x1F900, 0x1F9FF}, {0xE0000, 0xE007F}};
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    auto& r = ranges[rng() % std::size(ranges)];
    uint32_t c = r[0] + rng() % (r[1] - r[0] + 1);
    if (c < 0x80) s += char(c);
    else if (c < 0x800) s += char(0xC0 | (c >> 6)), s += char(0x80 | (c & 0x3F));
    else if (c < 0x10000) s += char(0xE0 | (c >> 12)), s += char(0x80 | ((c >> 6) & 0x3F)), s += char(0x80 | (c & 0x3F));
    else
      s += char(0xF0 | (c >> 18)), s += char(0x80 | ((c >> 12) & 0x3F)), s += char(0x80 | ((c >> 6) & 0x3F)),
          s += char(0x80 | (c & 0x3F));
  }
  return s;
}

// Byte-level tokenizers without a normalizer are lossless: decode(encode(x)) == x for valid UTF-8,
// and == the U+FFFD-repaired text for any bytes.
TEST(Tokenizer, RoundTripsRandomInput) {
  for (const char* rel : {"tokenizers/gpt2", "models/bench-qwen3-16m", "tokenizers/llama3.2"}) {
    auto path = shared_file(std::string("data/") + rel);
    if (path.empty()) continue;
    auto tok = load_tokenizer(path);
    std::mt19937 rng(42);
    for (int k = 0; k < 300; ++k) {
      std::string u = random_unicode(rng, 1 + rng() % 80);
      auto ids = tok->encode(u);
      ASSERT_EQ(tok->decode(ids), u) << rel;
      for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->vocab_size());
      std::string b = random_bytes(rng, 1 + rng() % 60);
      ASSERT_EQ(tok->decode(tok->encode(b)), calq::text::sanitize_utf8(b)) << rel;
    }
    // Adversarial: long runs that stress the heap-based merge and the caches.
    for (std::string s : {std::string(5000, 'a'), std::string(3000, ' '), std::string(2000, '\n'),
                          std::string(1000, '9') + "x", random_unicode(rng, 4000)})
      ASSERT_EQ(tok->decode(tok->encode(s)), s) << rel;
  }
}

// SentencePiece and Llama-2's tokenizer.json agree on text without special tokens.
TEST(Tokenizer, Llama2JsonAndModelAgree) {
  auto j = shared_file("data/tokenizers/llama2/tokenizer.json");
  auto m = shared_file("data/tokenizers/llama2/tokenizer.model");
  if (j.empty() || m.empty()) GTEST_SKIP();
  auto a = load_tokenizer(j), b = load_tokenizer(m);
  std::mt19937 rng(7);
  for (int k = 0; k < 200; ++k) {
    std::string u = random_unicode(rng, 1 + rng() % 40);
    EXPECT_EQ(a->encode(u), b->encode(u)) << u;
  }
  EXPECT_EQ(a->bos_id(), 1);
  EXPECT_EQ(b->bos_id(), 1);
  EXPECT_TRUE(a->adds_bos());
  EXPECT_TRUE(b->adds_bos());
  EXPECT_EQ(a->eos_id(), 2);
}

TEST(Tokenizer, ParallelEncodeEqualsSerial) {
  auto wiki = shared_file("data/wikitext-2-raw/wiki.test.raw");
  if (wiki.empty()) GTEST_SKIP();
  std::string text = slurp(wiki);
  for (const char* rel : {"models/bench-qwen3-16m", "tokenizers/gpt2", "tokenizers/qwen"}) {
    auto path = shared_file(std::string("data/") + rel);
    if (path.empty()) continue;
    auto tok = load_tokenizer(path);
    EXPECT_EQ(tok->encode_parallel(text, true, 8), tok->encode(text, true)) << rel;
    std::vector<std::string> lines;
    std::istringstream in(text.substr(0, 20000));
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    auto batch = tok->encode_batch(lines, false, 4);
    for (size_t i = 0; i < lines.size(); ++i) ASSERT_EQ(batch[i], tok->encode(lines[i]));
  }
}

TEST(Tokenizer, BosEosRules) {
  if (auto p = shared_file("data/models/bench-qwen3-16m"); !p.empty()) {
    auto t = load_tokenizer(p);
    EXPECT_FALSE(t->adds_bos());
    EXPECT_EQ(t->eos_id(), t->token_to_id("<|endoftext|>"));
    EXPECT_EQ(t->encode("hi", true), t->encode("hi", false));
  }
  if (auto p = shared_file("data/tokenizers/llama3.2"); !p.empty()) {
    auto t = load_tokenizer(p);
    EXPECT_TRUE(t->adds_bos());
    EXPECT_EQ(t->bos_id(), 128000);
    EXPECT_EQ(t->eos_id(), 128001);
    EXPECT_EQ(t->vocab_size(), 128256);
    EXPECT_EQ(t->encode("hi", true).front(), 128000);
  }
  if (auto p = shared_file("data/tokenizers/qwen"); !p.empty()) {
    auto t = load_tokenizer(p);
    EXPECT_EQ(t->token_to_id("<|im_start|>"), 151644);
    EXPECT_EQ(t->token_to_id("<|extra_0|>"), 151646);
    EXPECT_EQ(t->vocab_size(), 151643 + 208);
  }
}

// ---- malformed files ----
fs::path write(const fs::path& dir, const std::string& name, const std::string& body) {
  fs::create_directories(dir);
  std::ofstream(dir / name) << body;
  return dir / name;
}

std::string error_of(const fs::path& p) {
  try {
    load_tokenizer(p);
  } catch (const calq::Error& e) {
    return e.what();
  }
  return "";
}

json tiny_json() {
  return json::parse(R"({
    "added_tokens": [{"id": 5, "content": "<s>", "special": true, "lstrip": false, "rstrip": false,
                      "single_word": false, "normalized": false}],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}]},
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [5]}}},
    "decoder": {"type": "Fuse"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4}, "merges": ["a b", ["ab", "c"]]}
  })");
}

TEST(Tokenizer, TinyJsonPipeline) {
  calq_test::TempDir tmp;
  auto p = write(tmp.path(), "tokenizer.json", tiny_json().dump());
  auto t = load_tokenizer(p);
  EXPECT_EQ(t->encode("abc ab  c<s>a"), (std::vector<int32_t>{4, 2, 3, 5, 0}));
  EXPECT_EQ(t->encode("abc", true), (std::vector<int32_t>{5, 4}));
  EXPECT_EQ(t->bos_id(), 5);
  EXPECT_EQ(t->decode(std::vector<int32_t>{4, 5, 2}, true), "abcab");
  EXPECT_THROW(t->decode(std::vector<int32_t>{6}), calq::Error);
  EXPECT_THROW(t->decode(std::vector<int32_t>{-1}), calq::Error);
}

TEST(Tokenizer, MalformedFilesAreNamed) {
  calq_test::TempDir tmp;
  auto d = tmp.path();
  {
    json j = tiny_json();
    j.erase("model");
    auto e = error_of(write(d / "m1", "tokenizer.json", j.dump()));
    EXPECT_NE(e.find("missing \"model\""), std::string::npos) << e;
  }
  {
    json j = tiny_json();
    j["pre_tokenizer"]["pretokenizers"].push_back({{"type", "Frobnicate"}});
    auto e = error_of(write(d / "m2", "tokenizer.json", j.dump()));
    EXPECT_NE(e.find("pre_tokenizer.pretokenizers[1]"), std::string::npos) << e;
    EXPECT_NE(e.find("Frobnicate"), std::string::npos) << e;
  }
  {
    json j = tiny_json();
    j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "Weird"}}}}};
    auto e = error_of(write(d / "m3", "tokenizer.json", j.dump()));
    EXPECT_NE(e.find("normalizer.normalizers[1]"), std::string::npos) << e;
    EXPECT_NE(e.find("Weird"), std::string::npos) << e;
  }
  {
    json j = tiny_json();
    j["decoder"] = {{"type", "WordPieceX"}};
    auto e = error_of(write(d / "m4", "tokenizer.json", j.dump()));
    EXPECT_NE(e.find("decoder"), std::string::npos) << e;
    EXPECT_NE(e.find("WordPieceX"), std::string::npos) << e;
  }
  {
    json j = tiny_json();
    j["model"]["merges"].push_back("a zz");
    auto e = error_of(write(d / "m5", "tokenizer.json", j.dump()));
    EXPECT_NE(e.find("\"zz\""), std::string::npos) << e;
    EXPECT_NE(e.find("model.merges[2]"), std::string::npos) << e;
  }
  {
    auto e = error_of(write(d / "m6", "tokenizer.json", "{not json"));
    EXPECT_NE(e.find("invalid JSON"), std::string::npos) << e;
  }
  {
    json j = tiny_json();
    j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
    auto e = error_of(write(d / "m7", "tokenizer.json", j.dump()));
    EXPECT_NE(e.find("invalid regex"), std::string::npos) << e;
  }
  {
    write(d / "p1", "vocab.json", R"({"a": 0, "b": 1, "ab": 2})");
    auto e = error_of(d / "p1" / "vocab.json");
    EXPECT_NE(e.find("merges.txt"), std::string::npos) << e;
    write(d / "p1", "merges.txt", "#version: 0.2\na b\nq b\n");
    e = error_of(d / "p1");
    EXPECT_NE(e.find("\"q\""), std::string::npos) << e;
    EXPECT_NE(e.find("merges.txt:3"), std::string::npos) << e;
  }
  {
    auto e = error_of(d / "nope");
    EXPECT_NE(e.find("does not exist"), std::string::npos) << e;
    fs::create_directories(d / "empty");
    e = error_of(d / "empty");
    EXPECT_NE(e.find("holds no tokenizer.json"), std::string::npos) << e;
    e = error_of(write(d / "t1", "x.tiktoken", "IQ== zero\n"));
    EXPECT_NE(e.find("invalid rank"), std::string::npos) << e;
    e = error_of(write(d / "s1", "tokenizer.model", "garbage"));
    EXPECT_NE(e.find("not a SentencePiece model"), std::string::npos) << e;
  }
}

}  // namespace

namespace {

std::unique_ptr<Tokenizer> tiny(const json& j) {
  static int n = 0;
  auto dir = fs::temp_directory_path() / ("calq-tok-tiny-" + std::to_string(getpid()) + "-" + std::to_string(n++));
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << j.dump();
  auto t = load_tokenizer(dir / "tokenizer.json");
  fs::remove_all(dir);
  return t;
}

json split_tok(const std::string& behavior, bool invert) {
  json j = json::parse(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "-": 2, "a-": 3, "-b": 4, "--": 5},
                           "merges": ["a -", "- b", "- -"]}})");
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", invert}};
  return j;
}

}  // namespace

// Split behaviours, seen through merges that only happen inside one piece.
TEST(Tokenizer, SplitBehaviors) {
  using V = std::vector<int32_t>;
  EXPECT_EQ(tiny(split_tok("Isolated", false))->encode("a-b"), (V{0, 2, 1}));
  EXPECT_EQ(tiny(split_tok("Removed", false))->encode("a-b"), (V{0, 1}));
  EXPECT_EQ(tiny(split_tok("MergedWithPrevious", false))->encode("a-b"), (V{3, 1}));
  EXPECT_EQ(tiny(split_tok("MergedWithNext", false))->encode("a-b"), (V{0, 4}));
  EXPECT_EQ(tiny(split_tok("Isolated", false))->encode("a--b"), (V{0, 2, 2, 1}));
  EXPECT_EQ(tiny(split_tok("Contiguous", false))->encode("a--b"), (V{0, 5, 1}));
  EXPECT_EQ(tiny(split_tok("Removed", true))->encode("a-b"), (V{2}));
  auto bad = split_tok("Sideways", false);
  EXPECT_THROW(tiny(bad), calq::Error);
}

TEST(Tokenizer, MetaspaceByteFallbackAndStrippedAddedTokens) {
  using V = std::vector<int32_t>;
  json j = json::parse(R"({"model": {"type": "BPE", "vocab": {"<unk>": 0, "\u2581": 1, "a": 2, "b": 3, "\u2581a": 4,
                           "\u2581b": 5, "<0x41>": 6, "<0xC3>": 7, "<0xA9>": 8, " ": 9, "x": 10, "<m>": 11},
                           "merges": ["\u2581 a", "\u2581 b"], "byte_fallback": true, "unk_token": "<unk>", "fuse_unk": true},
                           "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": true},
                           "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}]}})");
  auto t = tiny(j);
  EXPECT_EQ(t->encode("a b"), (V{4, 5}));
  EXPECT_EQ(t->encode("aA"), (V{4, 6}));       // 'A' is not in the vocabulary: byte fallback
  EXPECT_EQ(t->encode("a\xc3\xa9"), (V{4, 7, 8}));  // é as two byte tokens
  EXPECT_EQ(t->encode("a\xe2\x82\xac\xe2\x82\xac"), (V{4, 0}));  // no byte tokens for €: one fused <unk>
  EXPECT_EQ(t->decode(V{4, 5, 6, 7, 8}), "a bA\xc3\xa9");
  EXPECT_EQ(t->decode(V{4, 7}), "a\xef\xbf\xbd");  // a lone byte decodes to U+FFFD
  j["pre_tokenizer"]["prepend_scheme"] = "never";
  EXPECT_EQ(tiny(j)->encode("a b"), (V{2, 5}));

  json k = json::parse(R"({"model": {"type": "BPE", "vocab": {" ": 0, "x": 1, "y": 2}, "merges": []},
                           "added_tokens": [{"id": 3, "content": "<m>", "special": true, "lstrip": true, "rstrip": true,
                                             "single_word": false, "normalized": false},
                                            {"id": 4, "content": "<w>", "special": false, "lstrip": false, "rstrip": false,
                                             "single_word": true, "normalized": false}]})");
  auto s = tiny(k);
  EXPECT_EQ(s->encode("x <m> y"), (V{1, 3, 2}));
  EXPECT_EQ(s->encode("x <w> y"), (V{1, 0, 4, 0, 2}));
  // single_word: not inside a word; then '<' 'w' '>' are text, unknown and (no unk_token) dropped
  EXPECT_EQ(s->encode("x<w>y"), (V{1, 2}));
  EXPECT_EQ(s->encode_plain("x <m> y"), (V{1, 0, 0, 2}));  // a special token written in the text is text
  EXPECT_EQ(s->decode(V{1, 3, 2}, true), "xy");
}

// tokenizer_config.json: bos/eos as strings or AddedToken objects; explicit add_bos_token /
// add_eos_token replace the post-processor's template.
TEST(Tokenizer, TokenizerConfigBosEos) {
  calq_test::TempDir tmp;
  json j = tiny_json();
  j["added_tokens"].push_back({{"id", 6}, {"content", "</s>"}, {"special", true}, {"normalized", false}});
  std::ofstream(tmp.path() / "tokenizer.json") << j.dump();
  using V = std::vector<int32_t>;
  {
    auto t = load_tokenizer(tmp.path());
    EXPECT_EQ(t->encode("a", true), (V{5, 0}));  // the template
    EXPECT_EQ(t->eos_id(), std::nullopt);
  }
  std::ofstream(tmp.path() / "tokenizer_config.json")
      << R"({"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "add_eos_token": true})";
  {
    auto t = load_tokenizer(tmp.path());
    EXPECT_EQ(t->bos_id(), 5);
    EXPECT_EQ(t->eos_id(), 6);
    EXPECT_TRUE(t->adds_bos());
    EXPECT_EQ(t->encode("a", true), (V{5, 0, 6}));
    EXPECT_EQ(t->encode("a", false), (V{0}));
  }
  std::ofstream(tmp.path() / "tokenizer_config.json") << R"({"eos_token": "</s>", "add_bos_token": false})";
  {
    auto t = load_tokenizer(tmp.path());
    EXPECT_FALSE(t->adds_bos());
    EXPECT_EQ(t->encode("a", true), (V{0}));
  }
  std::ofstream(tmp.path() / "tokenizer_config.json") << R"({"eos_token": "<nope>"})";
  EXPECT_THROW(load_tokenizer(tmp.path()), calq::Error);
}
