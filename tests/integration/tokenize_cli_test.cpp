// calq tokenize end to end: formats, --count, --add-special-tokens, --decode, errors.
#include <cstring>

#include "support.h"

using namespace calq_test;

namespace {

fs::path gpt2() { return shared_file("data/tokenizers/gpt2"); }

std::vector<int32_t> read_bin(const fs::path& p) {
  std::string s = read_file(p);
  std::vector<int32_t> v(s.size() / 4);
  std::memcpy(v.data(), s.data(), v.size() * 4);  // the test machines are little-endian
  return v;
}

TEST(TokenizeCli, FormatsCountAndDecode) {
  if (gpt2().empty()) GTEST_SKIP() << "no gpt2 tokenizer";
  TempDir tmp;
  auto in = tmp.path() / "in.txt";
  write_file(in, "Hello world<|endoftext|>\n");
  auto r = run(calq_bin() + " -q tokenize --tokenizer " + gpt2().string() + " --input " + in.string() + " --output " +
               (tmp.path() / "ids.txt").string());
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(tmp.path() / "ids.txt"), "15496 995 50256 198\n");
  r = run(calq_bin() + " -q tokenize --tokenizer " + gpt2().string() + " --input " + in.string() + " --output " +
          (tmp.path() / "ids.bin").string() + " --format bin");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_bin(tmp.path() / "ids.bin"), (std::vector<int32_t>{15496, 995, 50256, 198}));
  r = run(calq_bin() + " -q tokenize --count --tokenizer " + gpt2().string() + " --input " + in.string());
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(r.output, "4\n");
  r = run(calq_bin() + " -q tokenize --decode --format bin --tokenizer " + gpt2().string() + " --input " +
          (tmp.path() / "ids.bin").string() + " --output " + (tmp.path() / "back.txt").string());
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(tmp.path() / "back.txt"), "Hello world<|endoftext|>\n");
}

TEST(TokenizeCli, AddSpecialTokens) {
  auto llama = shared_file("data/tokenizers/llama2/tokenizer.model");
  if (llama.empty()) GTEST_SKIP();
  TempDir tmp;
  auto in = tmp.path() / "in.txt";
  write_file(in, "Hello");
  auto base = calq_bin() + " -q tokenize --tokenizer " + llama.string() + " --input " + in.string() + " --output " +
              (tmp.path() / "o.txt").string();
  ASSERT_EQ(run(base).rc, 0);
  EXPECT_EQ(read_file(tmp.path() / "o.txt"), "15043\n");
  ASSERT_EQ(run(base + " --add-special-tokens").rc, 0);
  EXPECT_EQ(read_file(tmp.path() / "o.txt"), "1 15043\n");
}

TEST(TokenizeCli, ClearErrors) {
  TempDir tmp;
  auto in = tmp.path() / "in.txt";
  write_file(in, "x");
  auto r = run(calq_bin() + " tokenize --tokenizer " + (tmp.path() / "missing").string() + " --input " + in.string() +
               " --output " + (tmp.path() / "o").string());
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("does not exist"), std::string::npos) << r.output;
  fs::create_directories(tmp.path() / "bad");
  write_file(tmp.path() / "bad" / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": []},
    "pre_tokenizer": {"type": "NoSuchThing"}})");
  r = run(calq_bin() + " tokenize --tokenizer " + (tmp.path() / "bad").string() + " --input " + in.string() +
          " --output " + (tmp.path() / "o").string());
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("pre_tokenizer: unsupported pre-tokenizer type \"NoSuchThing\""), std::string::npos) << r.output;
  if (!gpt2().empty()) {
    write_file(tmp.path() / "ids.txt", "1 2 abc");
    r = run(calq_bin() + " tokenize --decode --tokenizer " + gpt2().string() + " --input " +
            (tmp.path() / "ids.txt").string() + " --output " + (tmp.path() / "o").string());
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find("\"abc\" is not a token id"), std::string::npos) << r.output;
    write_file(tmp.path() / "ids.txt", "1 99999");
    r = run(calq_bin() + " tokenize --decode --tokenizer " + gpt2().string() + " --input " +
            (tmp.path() / "ids.txt").string() + " --output " + (tmp.path() / "o").string());
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find("99999 is outside the vocabulary"), std::string::npos) << r.output;
  }
  r = run(calq_bin() + " tokenize --tokenizer x --input " + (tmp.path() / "nope.txt").string() + " --count");
  EXPECT_EQ(r.rc, 1) << r.output;
}

}  // namespace
