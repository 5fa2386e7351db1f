// Datasets: parsing of every local format, named-source resolution (CALQ_DATA, cache, download
// from a local HTTP server with every failure mode), seeded selection and calibration sequences.
#include "calq/data/dataset.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdlib>
#include <fstream>
#include <numeric>
#include <regex>
#include <set>

#include "calq/core/error.h"
#include "calq/data/archive.h"
#include "calq/data/fetch.h"
#include "calq/text/tokenizer.h"
#include "http_server.h"
#include "support.h"

namespace {

namespace fs = std::filesystem;
using namespace calq::data;
using calq_test::HttpResponse;
using calq_test::HttpServer;
using calq_test::TempDir;

// A byte tokenizer as a test double: id = byte + 3; BOS 1, EOS 2.
class ByteTokenizer : public calq::text::Tokenizer {
 public:
  explicit ByteTokenizer(bool adds_bos) : adds_bos_(adds_bos) {}
  std::vector<int32_t> encode(std::string_view t, bool special) const override {
    std::vector<int32_t> out;
    if (special && adds_bos_) out.push_back(1);
    for (unsigned char c : t) out.push_back(c + 3);
    return out;
  }
  std::string decode(std::span<const int32_t> ids, bool) const override {
    std::string s;
    for (auto i : ids)
      if (i >= 3) s += static_cast<char>(i - 3);
    return s;
  }
  int64_t vocab_size() const override { return 259; }
  std::optional<int32_t> bos_id() const override { return 1; }
  std::optional<int32_t> eos_id() const override { return 2; }
  bool adds_bos() const override { return adds_bos_; }
  std::string describe() const override { return "bytes"; }
  std::string id_to_token(int32_t id) const override { return id >= 3 ? std::string(1, static_cast<char>(id - 3)) : ""; }
  std::optional<int32_t> token_to_id(std::string_view t) const override {
    if (t.size() == 1) return static_cast<unsigned char>(t[0]) + 3;
    return std::nullopt;
  }

 private:
  bool adds_bos_;
};

void write(const fs::path& p, const std::string& s) { calq_test::write_file(p, s); }

void write_gz(const fs::path& p, const std::string& s) {
  gzFile g = gzopen(p.c_str(), "wb");
  ASSERT_TRUE(g);
  ASSERT_EQ(gzwrite(g, s.data(), static_cast<unsigned>(s.size())), static_cast<int>(s.size()));
  gzclose(g);
}

struct EnvGuard {
  std::string name;
  std::optional<std::string> old;
  EnvGuard(std::string n, const std::optional<std::string>& v) : name(std::move(n)) {
    if (const char* o = std::getenv(name.c_str())) old = o;
    if (v) setenv(name.c_str(), v->c_str(), 1);
    else unsetenv(name.c_str());
  }
  ~EnvGuard() {
    if (old) setenv(name.c_str(), old->c_str(), 1);
    else unsetenv(name.c_str());
  }
};

TEST(Paragraphs, BlankAndWhitespaceLinesSeparate) {
  EXPECT_EQ(split_paragraphs(""), std::vector<std::string>{});
  EXPECT_EQ(split_paragraphs("\n\n \n"), std::vector<std::string>{});
  EXPECT_EQ(split_paragraphs("a\nb\n\nc"), (std::vector<std::string>{"a\nb", "c"}));
  EXPECT_EQ(split_paragraphs(" = T = \n \n para one\n \n\n\npara two\r\nline\r\n"),
            (std::vector<std::string>{" = T = ", " para one", "para two\nline"}));
  EXPECT_EQ(split_paragraphs("x\n\t\n\ny"), (std::vector<std::string>{"x", "y"}));
}

TEST(LocalFiles, EveryFormat) {
  TempDir t;
  write(t / "a.txt", "first para\nstill first\n\nsecond\n");
  auto d = Dataset::from_local(t / "a.txt");
  EXPECT_EQ(d.samples, (std::vector<std::string>{"first para\nstill first", "second"}));
  EXPECT_EQ(d.document, "first para\nstill first\n\nsecond\n");

  write(t / "b.json", R"(["one", "two", "three"])");
  EXPECT_EQ(Dataset::from_local(t / "b.json").samples, (std::vector<std::string>{"one", "two", "three"}));
  write(t / "c.json", R"([{"text": "x"}, {"text": "y", "other": 1}])");
  EXPECT_EQ(Dataset::from_local(t / "c.json").samples, (std::vector<std::string>{"x", "y"}));
  write(t / "d.json", R"({"samples": ["s1", "s2"]})");
  EXPECT_EQ(Dataset::from_local(t / "d.json").samples, (std::vector<std::string>{"s1", "s2"}));

  write(t / "e.jsonl", "{\"text\": \"l1\"}\n\n{\"text\": \"l2\\nmore\"}\n\"bare\"\n");
  EXPECT_EQ(Dataset::from_local(t / "e.jsonl").samples, (std::vector<std::string>{"l1", "l2\nmore", "bare"}));
  LoadOptions field;
  field.text_field = "content";
  write(t / "f.jsonl", "{\"content\": \"c1\"}\n{\"content\": \"c2\"}\n");
  EXPECT_EQ(Dataset::from_local(t / "f.jsonl", field).samples, (std::vector<std::string>{"c1", "c2"}));

  write_gz(t / "g.jsonl.gz", "{\"text\": \"gz1\"}\n{\"text\": \"gz2\"}\n");
  EXPECT_EQ(Dataset::from_local(t / "g.jsonl.gz").samples, (std::vector<std::string>{"gz1", "gz2"}));
  write_gz(t / "h.json.gz", R"(["j1", "j2"])");
  EXPECT_EQ(Dataset::from_local(t / "h.json.gz").samples, (std::vector<std::string>{"j1", "j2"}));
  // C4's shards are named .json but hold one object per line.
  write_gz(t / "c4.json.gz", "{\"text\":\"doc a\",\"url\":\"u\"}\n{\"text\":\"doc b\",\"url\":\"v\"}\n");
  EXPECT_EQ(Dataset::from_local(t / "c4.json.gz").samples, (std::vector<std::string>{"doc a", "doc b"}));

  LoadOptions min;
  min.min_chars = 4;
  write(t / "m.json", R"(["abc", "abcd", "", "abcdefgh"])");
  auto dm = Dataset::from_local(t / "m.json", min);
  EXPECT_EQ(dm.samples, (std::vector<std::string>{"abcd", "abcdefgh"}));
  EXPECT_EQ(dm.dropped_short, 2u);
}

TEST(LocalFiles, ProgrammaticSamplesKeepNameAndVersion) {
  Dataset d({"alpha", "beta"}, "my_domain", "v7");
  EXPECT_EQ(d.name, "my_domain");
  EXPECT_EQ(d.version, "v7");
  EXPECT_EQ(d.document, "alpha\n\nbeta");
  EXPECT_EQ(d.truncate(1).samples, std::vector<std::string>{"alpha"});
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const calq::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(LocalFiles, BadInputErrorsNameTheLine) {
  TempDir t;
  write(t / "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok2\"}\n{not json}\n{\"title\": \"x\"}\n{\"text\": \"ok3\"}\n");
  std::string e = error_of([&] { Dataset::from_local(t / "bad.jsonl"); });
  EXPECT_NE(e.find("bad.jsonl:3"), std::string::npos) << e;
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;
  LoadOptions skip;
  skip.skip_bad_lines = true;
  auto d = Dataset::from_local(t / "bad.jsonl", skip);
  EXPECT_EQ(d.samples, (std::vector<std::string>{"ok", "ok2", "ok3"}));
  EXPECT_EQ(d.skipped_lines, 2u);
  write(t / "nofield.jsonl", "{\"text\": \"ok\"}\n{\"title\": \"x\"}\n");
  e = error_of([&] { Dataset::from_local(t / "nofield.jsonl"); });
  EXPECT_NE(e.find("nofield.jsonl:2"), std::string::npos) << e;
  EXPECT_NE(e.find("no field 'text'"), std::string::npos) << e;

  write(t / "empty.txt", "\n \n\n");
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "empty.txt"); }).find("empty"), std::string::npos);
  write(t / "empty.json", "[]");
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "empty.json"); }).find("empty"), std::string::npos);
  write(t / "obj.json", R"({"a": 1})");
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "obj.json"); }).find("expected an array"), std::string::npos);
  write(t / "num.json", R"([1, 2])");
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "num.json"); }).find("num.json[0]"), std::string::npos);
  write(t / "trunc.jsonl.gz", "");
  {
    std::string full;
    for (int i = 0; i < 2000; ++i) full += "{\"text\": \"line " + std::to_string(i) + "\"}\n";
    write_gz(t / "whole.jsonl.gz", full);
    std::string bytes = calq_test::read_file(t / "whole.jsonl.gz");
    write(t / "trunc.jsonl.gz", bytes.substr(0, bytes.size() / 2));
  }
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "trunc.jsonl.gz"); }).find("truncated"), std::string::npos);
  write(t / "notgz.jsonl.gz", "plain text");
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "notgz.jsonl.gz"); }).find("not a gzip"), std::string::npos);
  EXPECT_NE(error_of([&] { Dataset::from_local(t / "missing.txt"); }).find("does not exist"), std::string::npos);
  EXPECT_NE(error_of([&] { Dataset::load("no-such-source"); }).find("neither a file nor a named source"),
            std::string::npos);
  EXPECT_NE(error_of([&] { find_named_source("c4:9"); }).find("1..8"), std::string::npos);
}

TEST(Gzip, MultiMemberAndLarge) {
  TempDir t;
  std::string a(300000, 'a'), b = "tail";
  write_gz(t / "a.gz", a);
  write_gz(t / "b.gz", b);
  write(t / "ab.gz", calq_test::read_file(t / "a.gz") + calq_test::read_file(t / "b.gz"));
  EXPECT_EQ(read_gzip(t / "ab.gz"), a + b);
}

TEST(Zip, StoredAndDeflatedMembers) {
  TempDir t;
  const fs::path zip = t / "x.zip";
  auto r = calq_test::run("python3 -c \"import zipfile; z=zipfile.ZipFile('" + zip.string() +
                          "','w'); z.writestr(zipfile.ZipInfo('d/'), ''); "
                          "z.writestr('d/a.txt', 'hello '*1000, compress_type=zipfile.ZIP_DEFLATED); "
                          "z.writestr('b.txt', 'stored', compress_type=zipfile.ZIP_STORED); z.close()\"");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(zip_members(zip), (std::vector<std::string>{"d/a.txt", "b.txt"}));
  std::string want;
  for (int i = 0; i < 1000; ++i) want += "hello ";
  EXPECT_EQ(zip_extract(zip, "d/a.txt"), want);
  EXPECT_EQ(zip_extract(zip, "b.txt"), "stored");
  EXPECT_NE(error_of([&] { zip_extract(zip, "nope"); }).find("no member named nope"), std::string::npos);
  // A flipped byte inside the stored member fails its CRC.
  std::string bytes = calq_test::read_file(zip);
  size_t at = bytes.find("stored");
  ASSERT_NE(at, std::string::npos);
  bytes[at] = 'S';
  write(t / "bad.zip", bytes);
  EXPECT_NE(error_of([&] { zip_extract(t / "bad.zip", "b.txt"); }).find("CRC-32"), std::string::npos);
  write(t / "not.zip", "PK but not really a zip file at all, long enough to look");
  EXPECT_NE(error_of([&] { zip_members(t / "not.zip"); }).find("not a ZIP"), std::string::npos);
}

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 h;
  std::string m(1000000, 'a');
  for (size_t i = 0; i < m.size(); i += 4096) h.update(m.data() + i, std::min<size_t>(4096, m.size() - i));
  EXPECT_EQ(h.hex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// ---- downloads, against a local server ----

std::vector<std::string> listing(const fs::path& d) {
  std::vector<std::string> out;
  if (!fs::exists(d)) return out;
  for (auto& e : fs::directory_iterator(d)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(Download, SuccessAndEveryFailureLeavesNothingBehind) {
  HttpServer srv;
  TempDir t;
  const std::string body = "calibration text\n\nsecond paragraph\n";
  const std::string sha = sha256_hex(body);
  srv.set("/ok.txt", {200, body, {}, std::string::npos});
  srv.set("/cut.txt", {200, std::string(100000, 'z'), {}, 5000});
  srv.set("/declared.txt", {200, body, {{"X-Linked-Etag", "\"" + std::string(64, 'a') + "\""}}, std::string::npos});
  srv.set("/declared-ok.txt", {200, body, {{"X-Linked-Etag", "\"" + sha + "\""}}, std::string::npos});
  srv.set("/err.txt", {500, "boom", {}, std::string::npos});
  DownloadOptions o;
  o.progress = false;
  o.sha256 = sha;
  auto r = download_file(srv.url("/ok.txt"), t / "dl" / "ok.txt", o);
  EXPECT_EQ(r.bytes, body.size());
  EXPECT_TRUE(r.checked);
  EXPECT_EQ(calq_test::read_file(t / "dl" / "ok.txt"), body);

  auto expect_fail = [&](const std::string& path, DownloadOptions opt, const std::string& what) {
    const std::string e = error_of([&] { download_file(srv.url(path), t / "dl" / "out.txt", opt); });
    EXPECT_NE(e.find(what), std::string::npos) << path << ": " << e;
    EXPECT_NE(e.find(srv.url(path)), std::string::npos) << e;
    EXPECT_EQ(listing(t / "dl"), std::vector<std::string>{"ok.txt"}) << path;
  };
  DownloadOptions plain;
  plain.progress = false;
  expect_fail("/missing.txt", plain, "HTTP 404");
  expect_fail("/err.txt", plain, "HTTP 500");
  expect_fail("/cut.txt", plain, "cut off");
  DownloadOptions wrong = plain;
  wrong.sha256 = std::string(64, '0');
  expect_fail("/ok.txt", wrong, "SHA-256 mismatch");
  expect_fail("/declared.txt", plain, "declared by the server");
  auto d = download_file(srv.url("/declared-ok.txt"), t / "dl" / "decl.txt", plain);
  EXPECT_TRUE(d.checked);
  const std::string refused = error_of([&] { download_file("http://127.0.0.1:1/x", t / "dl" / "x", plain); });
  EXPECT_NE(refused.find("127.0.0.1:1"), std::string::npos) << refused;
}

TEST(NamedSources, ResolutionOrderAndOffline) {
  HttpServer srv;
  TempDir t;
  EnvGuard xdg("XDG_CACHE_HOME", (t / "xdg").string());
  EnvGuard data("CALQ_DATA", std::nullopt);
  EnvGuard off("CALQ_OFFLINE", std::nullopt);
  const std::string body = "para one\n\npara two\n";
  srv.set("/v.txt", {200, body, {}, std::string::npos});
  NamedSource src{"test-src", "", {{"v.txt", srv.url("/v.txt"), sha256_hex(body), "", ""}},
                  NamedSource::Kind::Paragraphs};
  LoadOptions o;
  o.progress = false;
  o.allow_download = false;
  std::string e = error_of([&] { resolve_source(src, o); });
  EXPECT_NE(e.find("v.txt is not in"), std::string::npos) << e;
  EXPECT_NE(e.find((t / "xdg" / "calq" / "datasets").string()), std::string::npos) << e;
  EXPECT_NE(e.find(srv.url("/v.txt")), std::string::npos) << e;
  EXPECT_EQ(srv.requests(), 0);

  o.allow_download = true;
  {
    EnvGuard off2("CALQ_OFFLINE", "1");
    EXPECT_NE(error_of([&] { resolve_source(src, o); }).find("downloads are off"), std::string::npos);
  }
  auto files = resolve_source(src, o);
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(files[0], t / "xdg" / "calq" / "datasets" / "v.txt");
  EXPECT_EQ(srv.requests(), 1);
  resolve_source(src, o);  // cached now
  EXPECT_EQ(srv.requests(), 1);
  // $CALQ_DATA wins over the cache.
  fs::create_directories(t / "mine");
  write(t / "mine" / "v.txt", "mine\n");
  EnvGuard data2("CALQ_DATA", (t / "mine").string());
  EXPECT_EQ(resolve_source(src, o)[0], t / "mine" / "v.txt");
}

TEST(NamedSources, ZipMemberIsExtractedAndVerified) {
  HttpServer srv;
  TempDir t;
  EnvGuard xdg("XDG_CACHE_HOME", (t / "xdg").string());
  EnvGuard data("CALQ_DATA", std::nullopt);
  EnvGuard off("CALQ_OFFLINE", std::nullopt);
  auto r = calq_test::run("python3 -c \"import zipfile; z=zipfile.ZipFile('" + (t / "w.zip").string() +
                          "','w',zipfile.ZIP_DEFLATED); z.writestr('w/wiki.test.raw', ' = A = \\n \\n text\\n'); z.close()\"");
  ASSERT_EQ(r.rc, 0) << r.output;
  srv.set("/w.zip", {200, calq_test::read_file(t / "w.zip"), {}, std::string::npos});
  LoadOptions o;
  o.progress = false;
  NamedSource bad{"w", "", {{"wiki.test.raw", srv.url("/w.zip"), "", "w/wiki.test.raw", std::string(64, 'b')}},
                  NamedSource::Kind::WikiRaw};
  EXPECT_NE(error_of([&] { resolve_source(bad, o); }).find("SHA-256"), std::string::npos);
  EXPECT_EQ(listing(t / "xdg" / "calq" / "datasets"), std::vector<std::string>{});
  NamedSource good = bad;
  good.files[0].member_sha256 = sha256_hex(" = A = \n \n text\n");
  auto files = resolve_source(good, o);
  EXPECT_EQ(calq_test::read_file(files[0]), " = A = \n \n text\n");
  EXPECT_EQ(listing(t / "xdg" / "calq" / "datasets"), std::vector<std::string>{"wiki.test.raw"});
}

TEST(NamedSources, SharedFilesThroughCalqData) {
  const fs::path cal = calq_test::shared_file("data/calibration/calibration_datav3.txt");
  const fs::path wiki = calq_test::shared_file("data/wikitext-2-raw/wiki.test.raw");
  if (cal.empty() || wiki.empty()) GTEST_SKIP() << "../shared absent";
  TempDir t;
  fs::copy_file(cal, t / "calibration_datav3.txt");
  fs::copy_file(wiki, t / "wiki.test.raw");
  EnvGuard data("CALQ_DATA", t.path().string());
  EnvGuard off("CALQ_OFFLINE", "1");
  // The v3 file's SHA-256 is the one calq downloads against.
  EXPECT_EQ(sha256_file(cal), find_named_source("bartowski-v3")->files[0].sha256);
  EXPECT_EQ(sha256_file(wiki), find_named_source("wikitext2")->files[0].member_sha256);

  // Independent count: paragraphs split by a regex on blank lines, at least 100 bytes.
  const std::string text = calq_test::read_file(cal);
  std::regex blank("\n[ \t\r]*\n[ \t\r\n]*");
  size_t want = 0;
  for (std::sregex_token_iterator it(text.begin(), text.end(), blank, -1), end; it != end; ++it) {
    std::string p = *it;
    while (!p.empty() && (p.back() == '\n' || p.back() == '\r')) p.pop_back();
    want += p.size() >= 100;
  }
  auto v3 = Dataset::v3();
  EXPECT_EQ(v3.size(), want);
  EXPECT_GT(v3.size(), 500u);
  EXPECT_EQ(v3.name, "bartowski-v3");
  EXPECT_EQ(Dataset::v3(128).size(), 128u);

  auto w = Dataset::load("wikitext2");
  EXPECT_EQ(w.document, calq_test::read_file(wiki));
  EXPECT_EQ(Dataset::load("wikitext2:test").document.size(), w.document.size());
  EXPECT_NE(error_of([&] { Dataset::load("wikitext2:train"); }).find("wiki.train.raw is not in"), std::string::npos);
}

// ---- selection ----

TEST(Shuffle, DeterministicPermutationAndRoughlyUniform) {
  std::vector<size_t> a(100), b;
  std::iota(a.begin(), a.end(), 0);
  b = a;
  auto c = a;
  seeded_shuffle(a, 42);
  seeded_shuffle(b, 42);
  seeded_shuffle(c, 43);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(std::set<size_t>(a.begin(), a.end()).size(), 100u);
  // Position of element 0 over many seeds: each of 5 slots about 1/5 of the time.
  std::vector<int> hits(5);
  for (uint64_t s = 0; s < 5000; ++s) {
    std::vector<size_t> v{0, 1, 2, 3, 4};
    seeded_shuffle(v, s);
    ++hits[std::find(v.begin(), v.end(), 0) - v.begin()];
  }
  for (int h : hits) EXPECT_NEAR(h, 1000, 150);
}

TEST(CalibrationSet, ConcatenatedWindowsMatchTheStream) {
  Dataset d({"aaaa", "bbbb", "aaaa", "cc", "dddddd"}, "t", "v");
  ByteTokenizer tok(true);
  SelectOptions o;
  o.samples = 3;
  o.seq_len = 5;
  o.shuffle = false;
  o.separator = "|";
  auto cs = make_calibration_set(d, tok, o);
  EXPECT_EQ(cs.duplicates_removed, 1u);
  // Stream: aaaa|bbbb|cc|dddddd (dedup drops the second aaaa); windows of 4 after BOS.
  const std::string stream = "aaaa|bbbb|cc|dddddd";
  ASSERT_EQ(cs.tokens.size(), 3u);
  for (size_t w = 0; w < 3; ++w) {
    ASSERT_EQ(cs.tokens[w].size(), 5u);
    EXPECT_EQ(cs.tokens[w][0], 1);
    EXPECT_EQ(tok.decode(std::span(cs.tokens[w]).subspan(1), false), stream.substr(w * 4, 4));
    EXPECT_EQ(cs.lengths[w], 5);
  }
  ByteTokenizer nobos(false);
  auto cs2 = make_calibration_set(d, nobos, o);
  EXPECT_EQ(nobos.decode(cs2.tokens[1], false), stream.substr(5, 5));
  o.samples = 10;
  std::string e = error_of([&] { make_calibration_set(d, tok, o); });
  EXPECT_NE(e.find("enough for 4 sequences"), std::string::npos) << e;
  // The seed changes the order, deterministically.
  o.samples = 2;
  o.shuffle = true;
  o.seed = 7;
  auto s1 = make_calibration_set(d, tok, o), s2 = make_calibration_set(d, tok, o);
  EXPECT_EQ(s1.tokens, s2.tokens);
}

TEST(CalibrationSet, PerSamplePadsAndMasks) {
  Dataset d({"abcdefghij", "xy", "", "klm", "xy"}, "t", "v");
  ByteTokenizer tok(true);
  SelectOptions o;
  o.samples = 10;
  o.seq_len = 6;
  o.shuffle = false;
  o.packing = Packing::PerSample;
  auto cs = make_calibration_set(d, tok, o);
  ASSERT_EQ(cs.tokens.size(), 3u);  // "" skipped, duplicate "xy" removed
  EXPECT_EQ(cs.lengths, (std::vector<int64_t>{6, 3, 4}));
  EXPECT_EQ(cs.tokens[0], (std::vector<int32_t>{1, 'a' + 3, 'b' + 3, 'c' + 3, 'd' + 3, 'e' + 3}));
  EXPECT_EQ(cs.tokens[1], (std::vector<int32_t>{1, 'x' + 3, 'y' + 3, 2, 2, 2}));
  EXPECT_EQ(cs.real_tokens(), 13);
  o.min_tokens = 3;
  auto cs3 = make_calibration_set(d, tok, o);
  EXPECT_EQ(cs3.lengths, (std::vector<int64_t>{6, 4}));
  EXPECT_EQ(cs3.too_short, 1u);
  o.bos = BosMode::Never;
  EXPECT_EQ(make_calibration_set(d, tok, o).tokens[1], (std::vector<int32_t>{'k' + 3, 'l' + 3, 'm' + 3, 2, 2, 2}));
}

TEST(Inspect, FiguresAndDomains) {
  EXPECT_EQ(classify_domain("def f(x):\n    return x + 1\n\nclass A:\n    pass;"), "code");
  EXPECT_EQ(classify_domain("#include <stdio.h>\nint main() {\n  printf(\"hi\");\n}"), "code");
  EXPECT_EQ(classify_domain("User: what is 2+2?\nAssistant: It is 4."), "chat");
  EXPECT_EQ(classify_domain("Solve $\\frac{a}{b} = c$ for $a$, then \\sum_{i} x_i."), "math");
  EXPECT_EQ(classify_domain("Москва — столица России, крупнейший город страны."), "non-english");
  EXPECT_EQ(classify_domain("東京は日本の首都です。"), "non-english");
  EXPECT_EQ(classify_domain("The quick brown fox jumps over the lazy dog, as foxes do."), "prose");

  Dataset d({"abc", "abc", "héllo wörld", "x"}, "t", "v");
  auto st = inspect(d, nullptr);
  EXPECT_EQ(st.samples, 4u);
  EXPECT_EQ(st.characters, 3u + 3u + 11u + 1u);
  EXPECT_EQ(st.duplicates, 1u);
  EXPECT_EQ(st.min_len, 1u);
  EXPECT_EQ(st.max_len, 11u);
  EXPECT_DOUBLE_EQ(st.median_len, 3.0);
  size_t total = 0;
  for (auto& [b, c] : st.histogram) total += c;
  EXPECT_EQ(total, 4u);
  ByteTokenizer tok(false);
  auto st2 = inspect(d, &tok);
  EXPECT_EQ(st2.tokens, 3 + 3 + 13 + 1);  // bytes, not characters
  EXPECT_EQ(st2.to_json()["tokens"], 20);
  EXPECT_EQ(st2.to_json()["domains"]["prose"].get<int>() + st2.to_json()["domains"]["non_english"].get<int>(), 4);
}

}  // namespace
