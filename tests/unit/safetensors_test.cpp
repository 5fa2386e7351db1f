// safetensors reader validation, writer layout and sharding, and the real shared checkpoints.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "calq/core/error.h"
#include "calq/io/safetensors.h"
#include "support.h"

using namespace calq;
using namespace calq::io;
using calq_test::TempDir;
namespace fs = std::filesystem;

namespace {

// Builds a safetensors image from a header JSON text and a data buffer.
std::string image(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::string error_of(const std::string& img) {
  try {
    SafetensorsFile::from_memory(reinterpret_cast<const std::byte*>(img.data()), img.size(), "test.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, ValidatesHeaders) {
  std::string ok = image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(8, 'x'));
  EXPECT_EQ(error_of(ok), "");
  struct Case {
    std::string img, needle;
  } cases[] = {
      {"short", "truncated"},
      {image("{", ""), "JSON"},
      {image("[]", ""), "object"},
      {image(R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", "x"), "Q7"},
      {image(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", ""), "non-negative"},
      {image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "xxxx"), "needs 8"},
      {image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "xxxx"), "reversed"},
      {image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "xxxx"), "truncated"},
      {image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "xxxxxxxx"), "trailing"},
      {image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
             "xxxxxx"), "overlaps"},
      {image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", "xxxxxxxx"), "gap"},
      {image(R"({"__metadata__":{"k":1}})", ""), "__metadata__"},
      {image(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}})", ""), "64 bits"},
      {image(R"({"a":{"dtype":"F32","shape":[1]}})", "xxxx"), "data_offsets"},
  };
  for (const auto& c : cases) {
    std::string e = error_of(c.img);
    EXPECT_NE(e.find(c.needle), std::string::npos) << "wanted '" << c.needle << "', got '" << e << "'";
    if (!e.empty()) EXPECT_NE(e.find("test.safetensors"), std::string::npos) << e;
  }
  // A header length beyond the file.
  std::string lie = image("{}", "");
  uint64_t big = 1000;
  std::memcpy(lie.data(), &big, 8);
  EXPECT_NE(error_of(lie).find("past the end"), std::string::npos);
  big = 200ull << 20;
  std::memcpy(lie.data(), &big, 8);
  EXPECT_NE(error_of(lie).find("100 MiB"), std::string::npos);
}

TEST(Safetensors, WriterRoundTripEveryDtype) {
  TempDir tmp;
  std::vector<std::pair<std::string, DType>> all = {
      {"f64", DType::F64}, {"f32", DType::F32}, {"f16", DType::F16}, {"bf16", DType::BF16},
      {"e4m3", DType::F8_E4M3}, {"e5m2", DType::F8_E5M2}, {"e8m0", DType::F8_E8M0}, {"i64", DType::I64},
      {"i32", DType::I32}, {"i16", DType::I16}, {"i8", DType::I8}, {"u8", DType::U8}, {"u16", DType::U16},
      {"u32", DType::U32}, {"u64", DType::U64}, {"bool", DType::BOOL}};
  {
    SafetensorsWriter w(tmp.path(), 1ull << 40, {{"format", "pt"}});
    for (auto& [n, d] : all) w.declare(n, d, {3, 5});
    w.declare("empty", DType::F32, {0});
    for (auto& [n, d] : all) {
      std::vector<uint8_t> b(15 * dtype_size(d));
      for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 7 + n.size());
      w.write(n, b.data(), b.size());
    }
    w.write("empty", nullptr, 0);
    auto files = w.finish();
    ASSERT_EQ(files, std::vector<std::string>{"model.safetensors"});
  }
  auto f = SafetensorsFile::open(tmp / "model.safetensors");
  EXPECT_EQ(f->metadata().at("format"), "pt");
  for (auto& [n, d] : all) {
    auto v = f->view(n);
    EXPECT_EQ(v.dtype, d);
    EXPECT_EQ(v.shape, (Shape{3, 5}));
    for (size_t i = 0; i < v.nbytes; ++i) ASSERT_EQ(static_cast<uint8_t>(v.data[i]), static_cast<uint8_t>(i * 7 + n.size()));
    f->release(n);
  }
  EXPECT_EQ(f->view("empty").nbytes, 0u);
  // The data section starts 8-byte aligned, and the independent test reader agrees.
  auto raw = calq_test::read_safetensors(tmp / "model.safetensors");
  EXPECT_EQ(raw.size(), all.size() + 1);
  uint64_t n = 0;
  std::string bytes = calq_test::read_file(tmp / "model.safetensors");
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
}

TEST(Safetensors, ShardingAndIndex) {
  TempDir tmp;
  {
    SafetensorsWriter w(tmp.path(), 1000, {});
    for (int i = 0; i < 5; ++i) w.declare("t" + std::to_string(i), DType::U8, {400});
    w.declare("big", DType::U8, {3000});  // larger than the limit: a shard of its own
    std::vector<uint8_t> b(3000, 1);
    w.write("big", b.data(), 3000);
    for (int i = 4; i >= 0; --i) w.write("t" + std::to_string(i), b.data(), 400);  // any order
    auto files = w.finish();
    EXPECT_EQ(files.back(), "model.safetensors.index.json");
    EXPECT_EQ(files.size(), 5u);  // 2+2+1 small, big alone, + index
  }
  EXPECT_TRUE(fs::exists(tmp / "model-00001-of-00004.safetensors"));
  auto idx = nlohmann::json::parse(calq_test::read_file(tmp / "model.safetensors.index.json"));
  EXPECT_EQ(idx["metadata"]["total_size"], 5 * 400 + 3000);
  EXPECT_EQ(idx["weight_map"]["big"], "model-00004-of-00004.safetensors");
  auto ck = Checkpoint::open(tmp.path());
  EXPECT_EQ(ck.names().size(), 6u);
  EXPECT_EQ(ck.total_bytes(), 5000u);
  EXPECT_EQ(ck.shard_paths().size(), 4u);
  // A tensor the index assigns to another shard, and a missing shard, are errors.
  idx["weight_map"]["t0"] = "model-00002-of-00004.safetensors";
  calq_test::write_file(tmp / "model.safetensors.index.json", idx.dump());
  EXPECT_THROW(Checkpoint::open(tmp.path()), Error);
  idx["weight_map"]["t0"] = "model-00001-of-00004.safetensors";
  calq_test::write_file(tmp / "model.safetensors.index.json", idx.dump());
  fs::remove(tmp / "model-00003-of-00004.safetensors");
  try {
    Checkpoint::open(tmp.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model-00003-of-00004.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, WriterMisuse) {
  TempDir tmp;
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {});
    w.declare("a", DType::F32, {2});
    EXPECT_THROW(w.declare("a", DType::F32, {2}), Error);
    float x[2] = {1, 2};
    EXPECT_THROW(w.write("b", x, 8), Error);
    EXPECT_THROW(w.write("a", x, 4), Error);
    EXPECT_THROW(w.declare("late", DType::F32, {1}), Error);  // after writing started... (plan fixed)
  }
  // Destroyed without finish(): no files left.
  for (const auto& e : fs::directory_iterator(tmp.path())) ADD_FAILURE() << "left behind: " << e.path();
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {});
    w.declare("a", DType::F32, {2});
    EXPECT_THROW(w.finish(), Error);  // never written
  }
  // Writing into a directory that does not exist fails with the file name.
  SafetensorsWriter w(tmp / "nope", 1 << 20, {});
  w.declare("a", DType::F32, {1});
  float x = 1;
  try {
    w.write("a", &x, 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, RealSharedModels) {
  auto m16 = calq_test::shared_file("data/models/bench-qwen3-16m");
  auto st = calq_test::shared_file("data/models/stories260K-hf");
  if (m16.empty() || st.empty()) GTEST_SKIP() << "../shared/data/models/{bench-qwen3-16m,stories260K-hf} not present";
  auto ck = Checkpoint::open(m16);
  EXPECT_EQ(ck.shard_paths().size(), 3u);
  EXPECT_EQ(ck.info("model.embed_tokens.weight").dtype, DType::BF16);
  EXPECT_EQ(ck.info("model.embed_tokens.weight").shape, (Shape{8192, 384}));
  auto s = Checkpoint::open(st);
  EXPECT_EQ(s.names().size(), 47u);
  EXPECT_EQ(s.info("model.layers.0.mlp.down_proj.weight").shape, (Shape{64, 172}));
  auto v = s.view("model.norm.weight");
  auto f = to_f32_vector(v);
  EXPECT_EQ(f.size(), 64u);
  for (float x : f) EXPECT_TRUE(std::isfinite(x));
}

}  // namespace
