// GGUF v3: exact bytes of a tiny file built by hand from the spec, round trips, and corruption.
#include "calq/io/gguf.h"

#include <gtest/gtest.h>

#include <cstring>

#include "calq/core/error.h"
#include "support.h"

namespace {

using namespace calq::io;

template <typename T>
void put(std::string& b, T v) {
  b.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_str(std::string& b, const std::string& s) {
  put<uint64_t>(b, s.size());
  b += s;
}

TEST(Gguf, TinyFileByteExact) {
  calq_test::TempDir t;
  GgufWriter w;
  w.set("general.architecture", GgufValue::str("llama"));
  w.set("llama.block_count", GgufValue::u32(2));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array({"a", "bc"}));
  w.add_tensor("w", {3, 2}, GgmlType::F32, [](std::vector<char>& b) {
    const float v[6] = {1, 2, 3, 4, 5, 6};
    b.assign(reinterpret_cast<const char*>(v), reinterpret_cast<const char*>(v) + sizeof v);
  });
  w.add_tensor("b", {2}, GgmlType::F16, [](std::vector<char>& b) { b.assign({0x00, 0x3c, 0x00, 0x40}); });
  w.write(t / "x.gguf");

  std::string want;
  want += "GGUF";
  put<uint32_t>(want, 3);
  put<uint64_t>(want, 2);
  put<uint64_t>(want, 3);
  put_str(want, "general.architecture");
  put<uint32_t>(want, 8);
  put_str(want, "llama");
  put_str(want, "llama.block_count");
  put<uint32_t>(want, 4);
  put<uint32_t>(want, 2);
  put_str(want, "tokenizer.ggml.tokens");
  put<uint32_t>(want, 9);
  put<uint32_t>(want, 8);
  put<uint64_t>(want, 2);
  put_str(want, "a");
  put_str(want, "bc");
  put_str(want, "w");
  put<uint32_t>(want, 2);
  put<uint64_t>(want, 3);
  put<uint64_t>(want, 2);
  put<uint32_t>(want, 0);
  put<uint64_t>(want, 0);
  put_str(want, "b");
  put<uint32_t>(want, 1);
  put<uint64_t>(want, 2);
  put<uint32_t>(want, 1);
  put<uint64_t>(want, 32);  // 24 bytes of "w" padded to 32
  while (want.size() % 32) want += '\0';
  for (float v : {1.f, 2.f, 3.f, 4.f, 5.f, 6.f}) put<float>(want, v);
  want += std::string(8, '\0');
  want += std::string("\x00\x3c\x00\x40", 4);
  while (want.size() % 32) want += '\0';
  EXPECT_EQ(calq_test::read_file(t / "x.gguf"), want);

  GgufReader r(t / "x.gguf");
  EXPECT_EQ(r.version(), 3u);
  EXPECT_EQ(r.find("general.architecture")->as_str(), "llama");
  EXPECT_EQ(r.find("llama.block_count")->as_u64(), 2u);
  ASSERT_EQ(r.find("tokenizer.ggml.tokens")->array.size(), 2u);
  EXPECT_EQ(r.find("tokenizer.ggml.tokens")->array[1].as_str(), "bc");
  ASSERT_EQ(r.tensors().size(), 2u);
  EXPECT_EQ(r.tensor("w")->ne, (std::vector<int64_t>{3, 2}));
  auto bytes = r.read(*r.tensor("b"));
  EXPECT_EQ(std::string(bytes.begin(), bytes.end()), std::string("\x00\x3c\x00\x40", 4));
}

TEST(Gguf, RoundTripAndErrors) {
  calq_test::TempDir t;
  GgufWriter w(64);
  w.set("f", GgufValue::f32(0.5f));
  w.set("i", GgufValue::i32(-7));
  w.set("b", GgufValue::boolean(true));
  w.set("ia", GgufValue::i32_array({1, -2, 3}));
  w.set("fa", GgufValue::f32_array({0.25f}));
  w.set("i", GgufValue::i32(-8));  // replaces
  std::vector<float> big(1000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i) * 0.5f;
  w.add_tensor("big", {10, 100}, GgmlType::F32, [&](std::vector<char>& b) {
    b.assign(reinterpret_cast<const char*>(big.data()), reinterpret_cast<const char*>(big.data() + big.size()));
  });
  w.add_tensor("small", {1}, GgmlType::F32, [](std::vector<char>& b) { b.assign(4, 0); });
  w.write(t / "r.gguf");
  GgufReader r(t / "r.gguf");
  EXPECT_EQ(r.metadata().size(), 6u);  // 5 keys + general.alignment
  EXPECT_EQ(r.find("i")->as_i64(), -8);
  EXPECT_DOUBLE_EQ(r.find("f")->as_f64(), 0.5);
  EXPECT_TRUE(r.find("b")->as_bool());
  EXPECT_EQ(r.find("ia")->array[1].as_i64(), -2);
  EXPECT_EQ(r.tensor("small")->offset % 64, 0u);
  auto got = r.read(*r.tensor("big"));
  EXPECT_EQ(std::memcmp(got.data(), big.data(), got.size()), 0);

  EXPECT_THROW(w.add_tensor("big", {1}, GgmlType::F32, nullptr), calq::Error);
  GgufWriter bad;
  bad.add_tensor("x", {4}, GgmlType::F32, [](std::vector<char>& b) { b.assign(3, 0); });
  EXPECT_THROW(bad.write(t / "bad.gguf"), calq::Error);
  EXPECT_FALSE(std::filesystem::exists(t / "bad.gguf"));

  const std::string all = calq_test::read_file(t / "r.gguf");
  calq_test::write_file(t / "trunc.gguf", all.substr(0, all.size() - 200));
  EXPECT_THROW(GgufReader(t / "trunc.gguf"), calq::Error);
  calq_test::write_file(t / "magic.gguf", "GGUX" + all.substr(4));
  EXPECT_THROW(GgufReader(t / "magic.gguf"), calq::Error);
  calq_test::write_file(t / "short.gguf", all.substr(0, 30));
  EXPECT_THROW(GgufReader(t / "short.gguf"), calq::Error);
}

}  // namespace
