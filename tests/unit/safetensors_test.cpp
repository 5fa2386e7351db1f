// safetensors: reader validation on hand-built byte images, writer layout and sharding, the
// checkpoint index rules, release(), writer misuse and I/O errors, and the real shared models.
#include "calq/io/safetensors.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <thread>

#include "calq/core/error.h"
#include "support.h"

using namespace calq;
using namespace calq::io;
using calq_test::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A safetensors image from a header text and a data buffer.
std::string image(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::unique_ptr<SafetensorsFile> parse(const std::string& img) {
  return SafetensorsFile::from_memory(reinterpret_cast<const std::byte*>(img.data()), img.size(),
                                      "test.safetensors");
}

// The error message of parsing img, or "" when it parses.
std::string error_of(const std::string& img) {
  try {
    parse(img);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string error_of_open(const fs::path& p) {
  try {
    Checkpoint::open(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "wanted '" << (needle) << "' in: " << (haystack)

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t b, uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
}

TEST(SafetensorsRead, RejectsBadImages) {
  const std::string f32x2 = entry("a", "F32", "[2]", 0, 8);
  ASSERT_EQ(error_of(image("{" + f32x2 + "}", std::string(8, 'x'))), "");
  struct Case {
    std::string what, img, needle;
    bool names_tensor;
  };
  const std::vector<Case> cases = {
      {"5-byte file", "short", "truncated", false},
      {"empty file", "", "truncated", false},
      {"not JSON", image("{", ""), "not valid JSON", false},
      {"invalid UTF-8", image("{\"\xff\":1}", ""), "not valid JSON", false},
      {"array header", image("[]", ""), "not a JSON object", false},
      {"string header", image("\"x\"", ""), "not a JSON object", false},
      {"entry not object", image(R"({"a":5})", ""), "entry is not a JSON object", true},
      {"dtype missing", image(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "xxxx"), "'dtype'",
       true},
      {"dtype not string", image(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "xxxx"),
       "'dtype'", true},
      {"unknown dtype", image("{" + entry("a", "Q7", "[1]", 0, 1) + "}", "x"), "unknown dtype 'Q7'",
       true},
      {"shape missing", image(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", "xxxx"), "'shape'",
       true},
      {"shape not array", image("{" + entry("a", "F32", "4", 0, 4) + "}", "xxxx"),
       "'shape' must be an array", true},
      {"negative dim", image("{" + entry("a", "F32", "[-1]", 0, 0) + "}", ""), "non-negative",
       true},
      {"float dim", image("{" + entry("a", "F32", "[1.5]", 0, 4) + "}", "xxxx"),
       "non-negative integers", true},
      {"string dim", image("{" + entry("a", "F32", "[\"1\"]", 0, 4) + "}", "xxxx"),
       "non-negative integers", true},
      {"dim above INT64_MAX",
       image("{" + entry("a", "U8", "[18446744073709551615]", 0, 0) + "}", ""),
       "non-negative integers", true},
      {"numel overflow",
       image("{" + entry("a", "F32", "[4294967296,4294967296,4294967296]", 0, 0) + "}", ""),
       "64 bits", true},
      {"byte size overflow",
       image("{" + entry("a", "F64", "[4611686018427387904]", 0, 0) + "}", ""),
       "more bytes than fit in 64 bits", true},
      {"offsets missing", image(R"({"a":{"dtype":"F32","shape":[1]}})", "xxxx"), "'data_offsets'",
       true},
      {"one offset", image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4]}})", "xxxx"),
       "[begin, end]", true},
      {"three offsets",
       image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}})", "xxxx"), "[begin, end]",
       true},
      {"negative offset",
       image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "xxxx"), "[begin, end]",
       true},
      {"string offsets",
       image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}})", "xxxx"),
       "[begin, end]", true},
      {"reversed", image("{" + entry("a", "F32", "[1]", 4, 0) + "}", "xxxx"), "reversed", true},
      {"size mismatch", image("{" + entry("a", "F32", "[2]", 0, 4) + "}", "xxxx"), "needs 8", true},
      {"data short", image("{" + f32x2 + "}", "xxxx"), "truncated", true},
      {"trailing bytes", image("{" + entry("a", "F32", "[1]", 0, 4) + "}", "xxxxxxxx"),
       "4 trailing bytes", false},
      {"overlap",
       image("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 2, 6) + "}",
             "xxxxxx"),
       "overlaps", true},
      {"gap", image("{" + entry("a", "F32", "[1]", 4, 8) + "}", "xxxxxxxx"), "gap of 4 bytes",
       true},
      {"empty tensor inside another",
       image("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("z", "F32", "[0]", 2, 2) + "}",
             "xxxx"),
       "overlaps", false},
      {"metadata value not string", image(R"({"__metadata__":{"k":1}})", ""), "__metadata__",
       false},
      {"metadata not object", image(R"({"__metadata__":[1]})", ""),
       "__metadata__ must be an object", false},
      {"duplicate tensor",
       image("{" + entry("a", "U8", "[1]", 0, 1) + "," + entry("a", "U8", "[1]", 1, 2) + "}", "xx"),
       "appears twice", true},
      {"duplicate key in entry",
       image(R"({"a":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", "x"),
       "duplicate key 'dtype'", true},
      {"duplicate metadata key", image(R"({"__metadata__":{"k":"1","k":"2"}})", ""),
       "duplicate key 'k'", false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    std::string e = error_of(c.img);
    ASSERT_FALSE(e.empty()) << "accepted";
    EXPECT_HAS(e, c.needle);
    EXPECT_HAS(e, "test.safetensors");
    if (c.names_tensor) {
      EXPECT_HAS(e, "tensor a");
    }
  }
  // Header lengths that do not fit.
  std::string lie = image("{}", "");
  uint64_t len = 1000;
  std::memcpy(lie.data(), &len, 8);
  EXPECT_HAS(error_of(lie), "runs past the end");
  len = 200ull << 20;
  std::memcpy(lie.data(), &len, 8);
  EXPECT_HAS(error_of(lie), "100 MiB");
  len = ~0ull;
  std::memcpy(lie.data(), &len, 8);
  EXPECT_HAS(error_of(lie), "100 MiB");
}

TEST(SafetensorsRead, AcceptsValidEdgeCases) {
  // Empty file body, null metadata, padding spaces, zero-size tensors at the boundaries, and JSON
  // entries not in offset order.
  EXPECT_EQ(error_of(image("{}", "")), "");
  EXPECT_EQ(error_of(image("{}      ", "")), "");
  EXPECT_EQ(error_of(image(R"({"__metadata__":null})", "")), "");
  const std::string hdr =
      "{" + entry("c", "U8", "[2]", 5, 7) + "," + entry("z0", "F32", "[0,3]", 0, 0) + "," +
      entry("a", "I8", "[5]", 0, 5) + "," + entry("z1", "BF16", "[0]", 5, 5) + "," +
      entry("z2", "F64", "[0]", 7, 7) + "," + entry("s", "F8_E8M0", "[]", 7, 8) + "}  ";
  const std::string img = image(hdr, "01234567");
  auto f = parse(img);
  ASSERT_EQ(f->tensors().size(), 6u);
  std::vector<uint64_t> begins;
  for (const auto& t : f->tensors()) begins.push_back(t.begin);
  EXPECT_TRUE(std::is_sorted(begins.begin(), begins.end()));
  EXPECT_EQ(f->info("s").shape, Shape{});
  EXPECT_EQ(f->view("s").nbytes, 1u);
  EXPECT_EQ(static_cast<char>(f->view("s").data[0]), '7');
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f->view("a").data), 5), "01234");
  EXPECT_EQ(f->view("z0").nbytes, 0u);
  EXPECT_EQ(f->info("z0").shape, (Shape{0, 3}));
  EXPECT_TRUE(f->contains("c"));
  EXPECT_FALSE(f->contains("q"));
  try {
    f->info("q");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "test.safetensors");
    EXPECT_HAS(e.what(), "q");
  }
  f->release("a");  // from_memory: a no-op on memory the caller owns
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f->view("a").data), 5), "01234");
}

TEST(SafetensorsRead, OpenErrorsNameTheFile) {
  TempDir tmp;
  try {
    SafetensorsFile::open(tmp / "none.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "none.safetensors");
    EXPECT_HAS(e.what(), "No such file");
  }
  EXPECT_THROW(SafetensorsFile::open(tmp.path()), Error);  // a directory
  calq_test::write_file(tmp / "empty.safetensors", "");
  try {
    SafetensorsFile::open(tmp / "empty.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "empty.safetensors");
    EXPECT_HAS(e.what(), "truncated");
  }
  // A file cut short in its data names the tensor and says truncated.
  std::string img = image("{" + entry("w", "F32", "[4]", 0, 16) + "}", std::string(16, 'x'));
  calq_test::write_file(tmp / "cut.safetensors", img.substr(0, img.size() - 3));
  try {
    SafetensorsFile::open(tmp / "cut.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "cut.safetensors: tensor w");
    EXPECT_HAS(e.what(), "truncated");
  }
}

// Fills a tensor's bytes with a pattern that depends on its name, so mix-ups show.
std::vector<uint8_t> pattern(const std::string& name, size_t n) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(i * 7 + name.size() * 31 + name[0]);
  return b;
}

TEST(SafetensorsWrite, RoundTripEveryDtype) {
  TempDir tmp;
  const std::vector<std::pair<std::string, DType>> all = {
      {"f64", DType::F64},      {"f32", DType::F32},      {"f16", DType::F16},
      {"bf16", DType::BF16},    {"e4m3", DType::F8_E4M3}, {"e5m2", DType::F8_E5M2},
      {"e8m0", DType::F8_E8M0}, {"f4", DType::F4_E2M1},   {"i64", DType::I64},
      {"i32", DType::I32},      {"i16", DType::I16},      {"i8", DType::I8},
      {"u64", DType::U64},      {"u32", DType::U32},      {"u16", DType::U16},
      {"u8", DType::U8},        {"bool", DType::BOOL}};
  {
    SafetensorsWriter w(tmp.path(), 1ull << 40, {{"format", "pt"}, {"note", "ünïcode"}});
    for (auto& [n, d] : all) w.declare(n, d, {3, 4});
    w.declare("Zscalar", DType::F32, {});
    w.declare("empty", DType::F32, {0, 7});
    // Written in reverse order: the layout is fixed by the declarations.
    w.write("empty", nullptr, 0);
    w.write("Zscalar", pattern("Zscalar", 4).data(), 4);
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
      auto b = pattern(it->first, dtype_nbytes(it->second, 12));
      w.write(it->first, b.data(), b.size());
    }
    EXPECT_EQ(w.finish(), std::vector<std::string>{"model.safetensors"});
  }
  EXPECT_FALSE(fs::exists(tmp / "model.safetensors.tmp"));
  EXPECT_FALSE(fs::exists(tmp / "model.safetensors.index.json"));
  auto f = SafetensorsFile::open(tmp / "model.safetensors");
  EXPECT_EQ(f->metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode"}}));
  ASSERT_EQ(f->tensors().size(), all.size() + 2);
  for (auto& [n, d] : all) {
    SCOPED_TRACE(n);
    auto v = f->view(n);
    EXPECT_EQ(v.dtype, d);
    EXPECT_EQ(v.shape, (Shape{3, 4}));
    auto want = pattern(n, dtype_nbytes(d, 12));
    ASSERT_EQ(v.nbytes, want.size());
    EXPECT_EQ(std::memcmp(v.data, want.data(), want.size()), 0);
  }
  EXPECT_EQ(f->info("Zscalar").shape, Shape{});
  EXPECT_EQ(f->view("empty").nbytes, 0u);

  // The header: length a multiple of 8 (padded with spaces), __metadata__ first, then the tensors
  // in declaration order with ascending offsets; an independent reader agrees on every tensor.
  std::string bytes = calq_test::read_file(tmp / "model.safetensors");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
  auto h = nlohmann::ordered_json::parse(header);
  std::vector<std::string> keys;
  for (auto& [k, v] : h.items()) keys.push_back(k);
  ASSERT_EQ(keys.size(), all.size() + 3);
  EXPECT_EQ(keys[0], "__metadata__");
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(keys[i + 1], all[i].first);
  EXPECT_EQ(keys.back(), "empty");
  uint64_t prev_end = 0;
  for (size_t i = 1; i < keys.size(); ++i) {
    auto off = h[keys[i]]["data_offsets"];
    EXPECT_EQ(off[0].get<uint64_t>(), prev_end) << keys[i];
    prev_end = off[1];
  }
  auto raw = calq_test::read_safetensors(tmp / "model.safetensors");
  EXPECT_EQ(raw.size(), all.size() + 2);
  for (auto& [name, t] : raw) {
    auto v = f->view(name);
    EXPECT_EQ(t.bytes, std::string(reinterpret_cast<const char*>(v.data), v.nbytes)) << name;
    EXPECT_EQ(t.dtype, std::string(dtype_name(v.dtype))) << name;
  }
}

TEST(SafetensorsWrite, NoMetadataMeansNoMetadataKey) {
  TempDir tmp;
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {});
    w.finish();  // nothing declared: a valid, empty file
  }
  EXPECT_EQ(calq_test::read_file(tmp / "model.safetensors").substr(8), "{}      ");
  auto f = SafetensorsFile::open(tmp / "model.safetensors");
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_TRUE(f->metadata().empty());
}

TEST(SafetensorsWrite, ShardingAndIndex) {
  TempDir tmp;
  const uint64_t limit = 1000;
  // 400+400 | 400+400 | 3000 (over the limit: alone) | 400 | 0-byte tensor joins the last shard
  std::vector<std::pair<std::string, int64_t>> decl = {
      {"t0", 400}, {"t1", 400}, {"t2", 400}, {"t3", 400}, {"big", 3000}, {"t4", 400}, {"z", 0}};
  {
    SafetensorsWriter w(tmp.path(), limit, {{"format", "pt"}});
    for (auto& [n, s] : decl) w.declare(n, DType::U8, {s});
    for (auto it = decl.rbegin(); it != decl.rend(); ++it) {  // any order
      auto b = pattern(it->first, static_cast<size_t>(it->second));
      w.write(it->first, b.data(), b.size());
    }
    auto files = w.finish();
    EXPECT_EQ(files, (std::vector<std::string>{
                         "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                         "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                         "model.safetensors.index.json"}));
  }
  std::vector<std::string> on_disk;
  for (const auto& e : fs::directory_iterator(tmp.path())) on_disk.push_back(e.path().filename());
  EXPECT_EQ(on_disk.size(), 5u);  // no temp files left
  EXPECT_FALSE(fs::exists(tmp / "model.safetensors"));

  const std::map<std::string, std::vector<std::string>> want = {
      {"model-00001-of-00004.safetensors", {"t0", "t1"}},
      {"model-00002-of-00004.safetensors", {"t2", "t3"}},
      {"model-00003-of-00004.safetensors", {"big"}},
      {"model-00004-of-00004.safetensors", {"t4", "z"}}};
  for (const auto& [file, names] : want) {
    auto raw = calq_test::read_safetensors(tmp / file);
    std::vector<std::string> got;
    uint64_t bytes = 0;
    for (auto& [n, t] : raw) {
      got.push_back(n);
      bytes += t.bytes.size();
    }
    EXPECT_EQ(got, names) << file;
    if (file != "model-00003-of-00004.safetensors") {
      EXPECT_LE(bytes, limit) << file;
    }
    auto f = SafetensorsFile::open(tmp / file);
    EXPECT_EQ(f->metadata().at("format"), "pt") << file;  // metadata in every shard
  }
  // The index: pretty JSON, total size, every tensor mapped to its shard.
  std::string text = calq_test::read_file(tmp / "model.safetensors.index.json");
  EXPECT_NE(text.find("\n  \"weight_map\""), std::string::npos) << text;
  auto idx = json::parse(text);
  EXPECT_EQ(idx["metadata"]["total_size"], 5 * 400 + 3000);
  EXPECT_EQ(idx["weight_map"].size(), decl.size());
  for (const auto& [file, names] : want)
    for (const auto& n : names) EXPECT_EQ(idx["weight_map"][n], file) << n;

  auto ck = Checkpoint::open(tmp.path());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"big", "t0", "t1", "t2", "t3", "t4", "z"}));
  EXPECT_EQ(ck.total_bytes(), 5000u);
  EXPECT_EQ(ck.shard_paths().size(), 4u);
  for (auto& [n, s] : decl) {
    auto v = ck.view(n);
    auto b = pattern(n, static_cast<size_t>(s));
    ASSERT_EQ(v.nbytes, b.size());
    if (!b.empty()) {
      EXPECT_EQ(std::memcmp(v.data, b.data(), b.size()), 0) << n;
    }
  }
  EXPECT_EQ(ck.file_of("big").path(), tmp / "model-00003-of-00004.safetensors");
  // Opening through the index file itself works too.
  EXPECT_EQ(Checkpoint::open(tmp / "model.safetensors.index.json").names().size(), decl.size());
}

TEST(SafetensorsWrite, ConcurrentWritesOfDifferentTensors) {
  TempDir tmp;
  const int n = 64;
  {
    SafetensorsWriter w(tmp.path(), 4096, {});
    for (int i = 0; i < n; ++i) w.declare("t" + std::to_string(i), DType::U8, {1000 + i});
    std::vector<std::thread> threads;
    for (int k = 0; k < 4; ++k)
      threads.emplace_back([&, k] {
        for (int i = k; i < n; i += 4) {
          std::string name = "t" + std::to_string(i);
          auto b = pattern(name, static_cast<size_t>(1000 + i));
          w.write(name, b.data(), b.size());
        }
      });
    for (auto& t : threads) t.join();
    w.finish();
  }
  auto ck = Checkpoint::open(tmp.path());
  ASSERT_EQ(ck.names().size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    std::string name = "t" + std::to_string(i);
    auto v = ck.view(name);
    auto b = pattern(name, static_cast<size_t>(1000 + i));
    ASSERT_EQ(v.nbytes, b.size());
    EXPECT_EQ(std::memcmp(v.data, b.data(), b.size()), 0) << name;
  }
}

TEST(Checkpoint, IndexValidation) {
  TempDir tmp;
  {
    // Two shards of two tensors each: (t0, t1), (t2, t3).
    SafetensorsWriter w(tmp.path(), 200, {});
    for (int i = 0; i < 4; ++i) w.declare("t" + std::to_string(i), DType::U8, {100});
    std::vector<uint8_t> b(100, 1);
    for (int i = 0; i < 4; ++i) w.write("t" + std::to_string(i), b.data(), 100);
    w.finish();
  }
  const fs::path index = tmp / "model.safetensors.index.json";
  const json good = json::parse(calq_test::read_file(index));
  ASSERT_EQ(Checkpoint::open(tmp.path()).names().size(), 4u);
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = good;
    edit(j);
    calq_test::write_file(index, j.dump());
    return error_of_open(tmp.path());
  };
  // A tensor the index assigns to another shard.
  std::string e = with([](json& j) { j["weight_map"]["t0"] = "model-00002-of-00002.safetensors"; });
  EXPECT_HAS(e, "model-00001-of-00002.safetensors: tensor t0");
  EXPECT_HAS(e, "assigns it to model-00002-of-00002.safetensors");
  // A shard holding a tensor the index does not list.
  e = with([](json& j) { j["weight_map"].erase("t1"); });
  EXPECT_HAS(e, "tensor t1 is in this shard but not listed");
  // The index listing a tensor its shard lacks.
  e = with([](json& j) { j["weight_map"]["ghost"] = "model-00002-of-00002.safetensors"; });
  EXPECT_HAS(e,
             "model-00002-of-00002.safetensors: tensor ghost listed in "
             "model.safetensors.index.json is missing");
  // Malformed indexes.
  EXPECT_HAS(with([](json& j) { j.erase("weight_map"); }), "missing 'weight_map'");
  EXPECT_HAS(with([](json& j) { j["weight_map"] = json::array(); }),
             "'weight_map' is not an object");
  EXPECT_HAS(with([](json& j) { j["weight_map"] = json::object(); }), "lists no tensors");
  EXPECT_HAS(with([](json& j) { j["weight_map"]["t0"] = 3; }), "t0 is not a file name");
  EXPECT_HAS(with([](json& j) { j["weight_map"]["t0"] = "../x.safetensors"; }), "plain file name");
  calq_test::write_file(index, "{not json");
  e = error_of_open(tmp.path());
  EXPECT_HAS(e, "model.safetensors.index.json: not valid JSON");
  // A missing shard is named.
  calq_test::write_file(index, good.dump());
  fs::remove(tmp / "model-00002-of-00002.safetensors");
  e = error_of_open(tmp.path());
  EXPECT_HAS(e, "model-00002-of-00002.safetensors");
  EXPECT_HAS(e, "is missing");
  // A shard that is itself broken is named with the problem.
  calq_test::write_file(tmp / "model-00002-of-00002.safetensors", "garbage!!");
  EXPECT_HAS(error_of_open(tmp.path()), "model-00002-of-00002.safetensors: header length");
}

TEST(Checkpoint, SingleFileAndErrors) {
  TempDir tmp;
  EXPECT_HAS(error_of_open(tmp / "nothing-here"), "no such file or directory");
  // A directory without safetensors is named.
  {
    std::string e = error_of_open(tmp.path());
    EXPECT_HAS(e, tmp.path().string());
    EXPECT_HAS(e, "no model.safetensors");
  }
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {});
    w.declare("w", DType::F32, {2});
    float x[2] = {1.5f, -2};
    w.write("w", x, sizeof x);
    w.finish();
  }
  auto dir = Checkpoint::open(tmp.path());
  auto file = Checkpoint::open(tmp / "model.safetensors");
  for (const auto* c : {&dir, &file}) {
    EXPECT_EQ(c->names(), std::vector<std::string>{"w"});
    EXPECT_EQ(c->shard_paths().size(), 1u);
    EXPECT_EQ(to_f32_vector(c->view("w")), (std::vector<float>{1.5f, -2}));
    try {
      c->info("nope");
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "no tensor named nope");
      EXPECT_HAS(e.what(), tmp.path().string());
    }
  }
  calq_test::write_file(tmp / "config.json", "{}");
  EXPECT_HAS(error_of_open(tmp / "config.json"), "not a .safetensors file");
}

// Resident set size of this process, in bytes.
int64_t rss_bytes() {
  std::ifstream f("/proc/self/statm");
  int64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
}

TEST(SafetensorsRead, ReleaseDropsPagesAndDataStaysReadable) {
  TempDir tmp;
  const size_t mib = 1 << 20, big = 32 * mib;
  {
    SafetensorsWriter w(tmp.path(), 1ull << 40, {});
    w.declare("head", DType::U8, {13});  // makes "big" start off a page boundary
    w.declare("big", DType::U8, {static_cast<int64_t>(big)});
    w.declare("tail", DType::U8, {13});
    std::vector<uint8_t> b = pattern("big", big);
    w.write("big", b.data(), b.size());
    w.write("head", pattern("head", 13).data(), 13);
    w.write("tail", pattern("tail", 13).data(), 13);
    w.finish();
  }
  auto f = SafetensorsFile::open(tmp / "model.safetensors");
  auto sum = [&](const std::string& n) {
    auto v = f->view(n);
    uint64_t s = 0;
    for (size_t i = 0; i < v.nbytes; ++i) s += static_cast<uint8_t>(v.data[i]) * (i % 251 + 1);
    return s;
  };
  const uint64_t want = sum("big");  // faults every page in
  const uint64_t head = sum("head"), tail = sum("tail");
  const int64_t before = rss_bytes();
  f->release("big");
  const int64_t after = rss_bytes();
  EXPECT_GT(before - after, static_cast<int64_t>(24 * mib)) << "RSS " << before << " -> " << after;
  // The pages come back from the file on the next access; neighbours sharing a page are intact.
  EXPECT_EQ(sum("big"), want);
  EXPECT_EQ(sum("head"), head);
  EXPECT_EQ(sum("tail"), tail);
  f->release("head");
  f->release("tail");
  EXPECT_EQ(sum("head"), head);
  EXPECT_THROW(f->release("nope"), Error);
}

TEST(SafetensorsWrite, Misuse) {
  TempDir tmp;
  float x[2] = {1, 2};
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {});
    w.declare("a", DType::F32, {2});
    w.declare("b", DType::F32, {2});
    w.declare("c", DType::F32, {2});
    EXPECT_THROW(w.declare("a", DType::F32, {2}), Error);
    EXPECT_THROW(w.declare("", DType::F32, {2}), Error);
    EXPECT_THROW(w.declare("__metadata__", DType::F32, {2}), Error);
    EXPECT_THROW(w.declare("neg", DType::F32, {-2}), Error);
    try {
      w.write("undeclared", x, 8);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "undeclared was not declared");
    }
    try {
      w.write("a", x, 4);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "tensor a has 4 bytes");
      EXPECT_HAS(e.what(), "8 bytes");
    }
    w.write("a", x, 8);
    try {
      w.write("a", x, 8);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "tensor a written twice");
    }
    EXPECT_THROW(w.declare("late", DType::F32, {1}), Error);  // the layout is fixed by now
    try {
      w.finish();
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "never written: b, c");
    }
    EXPECT_TRUE(fs::exists(tmp / "model.safetensors.tmp"));
  }
  // Destroyed without a successful finish(): nothing left behind.
  for (const auto& e : fs::directory_iterator(tmp.path()))
    ADD_FAILURE() << "left behind: " << e.path();
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {});
    w.declare("a", DType::F32, {2});
    w.write("a", x, 8);
    w.finish();
    EXPECT_THROW(w.finish(), Error);
    EXPECT_THROW(w.write("a", x, 8), Error);
  }
  EXPECT_TRUE(fs::exists(tmp / "model.safetensors"));  // finished output survives destruction
  EXPECT_THROW(SafetensorsWriter(tmp.path(), 0, {}), Error);
}

TEST(SafetensorsWrite, IoErrorsNameTheFileAndCause) {
  TempDir tmp;
  float x = 1;
  {
    SafetensorsWriter w(tmp / "no-such-dir", 1 << 20, {});
    w.declare("a", DType::F32, {1});
    try {
      w.write("a", &x, 4);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "no-such-dir/model.safetensors");
      EXPECT_HAS(e.what(), "No such file or directory");
    }
    EXPECT_THROW(w.write("a", &x, 4), Error);  // the writer is unusable after a failure
    EXPECT_THROW(w.finish(), Error);
  }
  // A read-only directory (meaningless as root, who may write anyway).
  if (::geteuid() != 0) {
    fs::create_directory(tmp / "ro");
    fs::permissions(tmp / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    SafetensorsWriter w(tmp / "ro", 1 << 20, {});
    w.declare("a", DType::F32, {1});
    try {
      w.write("a", &x, 4);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "ro/model.safetensors");
      EXPECT_HAS(e.what(), "Permission denied");
    }
    fs::permissions(tmp / "ro", fs::perms::owner_all);
  }
}

// A full disk: the temp file is a symlink to /dev/full, where every write fails with ENOSPC
// (the writer follows the link like any open(O_CREAT) does; the link itself is what gets removed).
TEST(SafetensorsWrite, DiskFullIsReportedAndCleanedUp) {
  if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "/dev/full is not writable here";
  TempDir tmp;
  fs::create_symlink("/dev/full", tmp / "model.safetensors.tmp");
  {
    SafetensorsWriter w(tmp.path(), 1 << 20, {{"format", "pt"}});
    w.declare("a", DType::F32, {1024});
    std::vector<float> x(1024, 1.0f);
    try {
      w.write("a", x.data(), x.size() * 4);
      ADD_FAILURE() << "no error writing to /dev/full";
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "model.safetensors");
      EXPECT_HAS(e.what(), "No space left on device");
    }
  }
  EXPECT_FALSE(fs::exists(fs::symlink_status(tmp / "model.safetensors.tmp")));
  EXPECT_FALSE(fs::exists(tmp / "model.safetensors"));
  EXPECT_TRUE(fs::exists("/dev/full"));
}

TEST(SafetensorsRead, RealSharedModels) {
  const fs::path m16 = calq_test::shared_file("data/models/bench-qwen3-16m");
  const fs::path st = calq_test::shared_file("data/models/stories260K-hf");
  if (m16.empty() || st.empty())
    GTEST_SKIP() << "missing " << calq_test::shared_dir() / "data/models/bench-qwen3-16m"
                 << " or " << calq_test::shared_dir() / "data/models/stories260K-hf";
  // bench-qwen3-16m: 3 shards through the index; 8 layers x 11 tensors + embeddings + final norm
  // (tied: no lm_head), all BF16.
  auto ck = Checkpoint::open(m16);
  EXPECT_EQ(ck.shard_paths().size(), 3u);
  EXPECT_EQ(ck.names().size(), 90u);
  EXPECT_FALSE(ck.contains("lm_head.weight"));
  EXPECT_EQ(ck.info("model.embed_tokens.weight").shape, (Shape{8192, 384}));
  EXPECT_EQ(ck.info("model.layers.7.self_attn.q_proj.weight").shape, (Shape{6 * 64, 384}));
  EXPECT_EQ(ck.info("model.layers.7.self_attn.k_proj.weight").shape, (Shape{2 * 64, 384}));
  EXPECT_EQ(ck.info("model.layers.0.self_attn.k_norm.weight").shape, (Shape{64}));
  uint64_t total = 0;
  for (const auto& n : ck.names()) {
    EXPECT_EQ(ck.info(n).dtype, DType::BF16) << n;
    total += ck.info(n).end - ck.info(n).begin;
  }
  auto idx = json::parse(calq_test::read_file(m16 / "model.safetensors.index.json"));
  EXPECT_EQ(total, idx["metadata"]["total_size"].get<uint64_t>());
  EXPECT_EQ(ck.total_bytes(), total);
  // Bytes agree with the independent reader.
  auto raw = calq_test::read_model_tensors(m16);
  for (const char* n : {"model.norm.weight", "model.layers.3.mlp.down_proj.weight"}) {
    auto v = ck.view(n);
    EXPECT_EQ(raw.at(n).bytes, std::string(reinterpret_cast<const char*>(v.data), v.nbytes)) << n;
  }
  ck.release("model.embed_tokens.weight");

  // stories260K-hf: one file, 5 layers x 9 tensors + embeddings + norm, F32.
  auto s = Checkpoint::open(st);
  EXPECT_EQ(s.shard_paths().size(), 1u);
  EXPECT_EQ(s.names().size(), 47u);
  EXPECT_EQ(s.info("model.layers.0.mlp.down_proj.weight").shape, (Shape{64, 172}));
  EXPECT_EQ(s.info("model.embed_tokens.weight").dtype, DType::F32);
  EXPECT_EQ(s.file_of("model.norm.weight").metadata().at("format"), "pt");
  auto f = to_f32_vector(s.view("model.norm.weight"));
  ASSERT_EQ(f.size(), 64u);
  for (float x : f) EXPECT_TRUE(std::isfinite(x));
}

}  // namespace

// safetensors stores F4 two codes per byte: 12 elements are 6 bytes, and an odd count is refused
// both when writing and when reading.
TEST(SafetensorsF4, HalfByteElements) {
  EXPECT_EQ(dtype_nbytes(DType::F4_E2M1, 12), 6u);
  EXPECT_EQ(dtype_nbytes(DType::BF16, 12), 24u);
  EXPECT_THROW(dtype_nbytes(DType::F4_E2M1, 3), calq::Error);
  EXPECT_THROW(dtype_nbytes(DType::F64, 1ull << 62), calq::Error);
  TempDir tmp;
  SafetensorsWriter w(tmp.path(), 1ull << 40, {});
  EXPECT_THROW(w.declare("odd", DType::F4_E2M1, {3}), calq::Error);
  std::string header = R"({"odd":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})";
  std::string file(8, '\0');
  uint64_t n = header.size();
  std::memcpy(file.data(), &n, 8);
  file += header + std::string(2, '\0');
  calq_test::write_file(tmp / "odd.safetensors", file);
  EXPECT_THROW(SafetensorsFile::open(tmp / "odd.safetensors"), calq::Error);
}
