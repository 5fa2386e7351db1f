// The layer-wise run's storage: activation chunks round-trip through memory and disk exactly,
// spill beyond the budget, persist and reopen; corrupt or truncated files are errors; layer
// outputs (quantized weights, replaced tensors, report) round-trip; manifests are compared key by
// key; a resume with another manifest is refused.
#include "calq/pipeline/work_dir.h"

#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "calq/core/error.h"
#include "calq/quant/rtn.h"
#include "support.h"

namespace {

using namespace calq;
using namespace calq::pipeline;
using calq_test::TempDir;
namespace fs = std::filesystem;

engine::Activations random_chunk(std::mt19937& rng, int64_t batch, int64_t seq, int64_t hidden) {
  std::normal_distribution<float> d;
  engine::Activations a;
  a.batch = batch;
  a.seq = seq;
  a.hidden = hidden;
  for (int64_t b = 0; b < batch; ++b) a.lengths.push_back(seq - b);
  a.data.resize(static_cast<size_t>(batch * seq * hidden));
  for (auto& v : a.data) v = d(rng);
  a.data[0] = -0.f;
  a.data[1] = std::numeric_limits<float>::denorm_min();
  return a;
}

bool same(const engine::Activations& a, const engine::Activations& b) {
  return a.batch == b.batch && a.seq == b.seq && a.hidden == b.hidden && a.lengths == b.lengths &&
         a.data.size() == b.data.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0;
}

TEST(ActivationStore, SpillsBeyondBudgetAndRoundTrips) {
  TempDir t;
  std::mt19937 rng(1);
  std::vector<engine::Activations> ref;
  for (int i = 0; i < 5; ++i) ref.push_back(random_chunk(rng, 2, 7, 5));
  const uint64_t one = 2 * 7 * 5 * 4 + 2 * 8 + 64;
  ActivationStore s(t / "a", 2 * one, ref.size());  // two chunks fit in memory
  for (size_t i = 0; i < ref.size(); ++i) s.put(i, ref[i]);
  EXPECT_EQ(s.chunks_on_disk(), 3u);
  EXPECT_LE(s.bytes_in_memory(), 2 * one);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same(s.get(i), ref[i])) << i;
  // Replacing a spilled chunk keeps it on disk with the new value; unlimited budget keeps all.
  ref[4].data[3] = 42.f;
  s.put(4, ref[4]);
  EXPECT_TRUE(same(s.get(4), ref[4]));
  s.persist();
  auto r = ActivationStore::open(t / "a", 0);
  ASSERT_EQ(r.size(), ref.size());
  EXPECT_EQ(r.chunks_on_disk(), 0u);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same(r.get(i), ref[i])) << i;
}

TEST(ActivationStore, CorruptFilesAreErrors) {
  TempDir t;
  std::mt19937 rng(2);
  auto a = random_chunk(rng, 1, 4, 3);
  ActivationStore::write_chunk(t / "c.bin", a);
  EXPECT_TRUE(same(ActivationStore::read_chunk(t / "c.bin"), a));
  const auto full = fs::file_size(t / "c.bin");
  fs::resize_file(t / "c.bin", full - 4);
  EXPECT_THROW(ActivationStore::read_chunk(t / "c.bin"), calq::Error);
  ActivationStore::write_chunk(t / "c.bin", a);
  {
    std::fstream f(t / "c.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    f.write("XXXX", 4);
  }
  EXPECT_THROW(ActivationStore::read_chunk(t / "c.bin"), calq::Error);
  EXPECT_THROW(ActivationStore::open(t / "missing", 0), calq::Error);
  // A gap in the chunk numbering.
  fs::create_directories(t / "gap");
  ActivationStore::write_chunk(t / "gap" / "chunk_00000.bin", a);
  ActivationStore::write_chunk(t / "gap" / "chunk_00002.bin", a);
  EXPECT_THROW(ActivationStore::open(t / "gap", 0), calq::Error);
}

TEST(Manifest, DifferencesNameTheKeys) {
  nlohmann::json a = {{"options", {{"gptq", {{"damp", 0.01}, {"act_order", false}}}}}, {"model", "x"}};
  nlohmann::json b = a;
  EXPECT_TRUE(manifest_differences(a, b).empty());
  b["options"]["gptq"]["damp"] = 0.05;
  b["extra"] = 1;
  auto d = manifest_differences(a, b);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_NE(d[0].find("options.gptq.damp: 0.01 -> 0.05"), std::string::npos) << d[0];
  EXPECT_NE(d[1].find("extra: (absent) -> 1"), std::string::npos) << d[1];
}

TEST(WorkDir, LayerOutputsRoundTripAndResumeChecksManifest) {
  TempDir t;
  const fs::path dir = t / "w";
  nlohmann::json manifest = {{"options", {{"damp", 0.01}}}};
  std::mt19937 rng(3);
  std::normal_distribution<float> d;
  std::vector<float> w(16 * 64);
  for (auto& v : w) v = d(rng);
  auto f = quant::Format::parse("int4", 32);
  auto q = quant::rtn_quantize(w.data(), 16, 64, f, {});
  {
    WorkDir wd(dir, manifest, false, false);
    EXPECT_EQ(wd.completed_layers(), 0);
    LayerOutput out;
    out.weights.emplace("m.layers.0.a.weight", q);
    Tensor norm(DType::BF16, {64});
    for (size_t i = 0; i < norm.bytes.size(); ++i) norm.bytes[i] = std::byte(i * 7);
    out.replaced.emplace("m.layers.0.norm.weight", norm);
    out.report.push_back({{"module", "m.layers.0.a"}, {"proxy_loss", 1.5}});
    ActivationStore next(wd.acts_dir(1), 0, 1);
    next.put(0, random_chunk(rng, 1, 3, 2));
    wd.finish_layer(0, out, &next);
    EXPECT_EQ(wd.completed_layers(), 1);
    EXPECT_TRUE(fs::exists(wd.acts_dir(1) / "chunk_00000.bin"));
  }
  // A fresh run refuses the existing directory; overwrite discards it.
  EXPECT_THROW(WorkDir(dir, manifest, false, false), calq::Error);
  // Resume with another manifest: refused naming the key.
  try {
    WorkDir(dir, {{"options", {{"damp", 0.02}}}}, true, false);
    ADD_FAILURE() << "accepted another manifest";
  } catch (const calq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("options.damp"), std::string::npos) << e.what();
  }
  WorkDir wd(dir, manifest, true, false);
  EXPECT_EQ(wd.completed_layers(), 1);
  auto idx = wd.weight_index();
  ASSERT_EQ(idx.size(), 1u);
  auto back = wd.load_weight(idx.begin()->second, "m.layers.0.a.weight", f);
  EXPECT_EQ(back.codes, q.codes);
  ASSERT_EQ(back.params.size(), q.params.size());
  for (size_t i = 0; i < q.params.size(); ++i) EXPECT_EQ(back.params[i].scale, q.params[i].scale);
  auto rep = wd.replaced_index();
  ASSERT_EQ(rep.count("m.layers.0.norm.weight"), 1u);
  auto nt = wd.load_replaced(0, "m.layers.0.norm.weight");
  EXPECT_EQ(nt.dtype, DType::BF16);
  EXPECT_EQ(nt.bytes[5], std::byte(35));
  EXPECT_EQ(wd.layer_report(0)[0]["proxy_loss"], 1.5);
  WorkDir fresh(dir, manifest, false, true);
  EXPECT_EQ(fresh.completed_layers(), 0);
}

}  // namespace
