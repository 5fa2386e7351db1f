// quantization_config: every format maps to compressed-tensors args and back; group structure.
#include <gtest/gtest.h>

#include "calq/core/error.h"
#include "calq/export/native.h"

using namespace calq;
using nlohmann::json;

namespace {

std::vector<quant::Format> all_formats() {
  std::vector<quant::Format> v;
  for (const char* n : {"int2", "int3", "int4", "int8"})
    for (bool sym : {true, false})
      for (int g : {32, 128, -1}) v.push_back(quant::Format::parse(n, g, sym));
  for (int g : {64, 128}) {
    v.push_back(quant::Format::parse("fp4", g));
    v.push_back(quant::Format::parse("nf4", g));
  }
  v.push_back(quant::Format::parse("nvfp4"));
  v.push_back(quant::Format::parse("mxfp4"));
  v.push_back(quant::Format::parse("fp8"));
  return v;
}

TEST(Native, ArgsRoundTrip) {
  for (const auto& f : all_formats()) {
    bool ct = false;
    std::string name = native::ct_format_name(f, &ct);
    auto back = native::format_from_args(native::weights_args(f), name, "test");
    EXPECT_EQ(back.family, f.family) << f.describe();
    EXPECT_EQ(back.bits, f.bits) << f.describe();
    EXPECT_EQ(back.symmetric, f.symmetric) << f.describe();
    EXPECT_EQ(back.group_size, f.group_size) << f.describe();
  }
}

TEST(Native, CompressedTensorsNames) {
  bool ct = false;
  EXPECT_EQ(native::ct_format_name(quant::Format::parse("int4"), &ct), "pack-quantized");
  EXPECT_TRUE(ct);
  EXPECT_EQ(native::ct_format_name(quant::Format::parse("nvfp4"), &ct), "nvfp4-pack-quantized");
  EXPECT_TRUE(ct);
  EXPECT_EQ(native::ct_format_name(quant::Format::parse("mxfp4"), &ct), "mxfp4-pack-quantized");
  EXPECT_TRUE(ct);
  EXPECT_EQ(native::ct_format_name(quant::Format::parse("fp8"), &ct), "float-quantized");
  EXPECT_TRUE(ct);
  native::ct_format_name(quant::Format::parse("fp4"), &ct);
  EXPECT_FALSE(ct);
  native::ct_format_name(quant::Format::parse("nf4"), &ct);
  EXPECT_FALSE(ct);
  auto a = native::weights_args(quant::Format::parse("nvfp4"));
  EXPECT_EQ(a["strategy"], "tensor_group");
  EXPECT_EQ(a["group_size"], 16);
  EXPECT_EQ(a["type"], "float");
  auto c = native::weights_args(quant::Format::parse("int8", -1));
  EXPECT_EQ(c["strategy"], "channel");
  EXPECT_TRUE(c["group_size"].is_null());
}

TEST(Native, ConfigGroups) {
  std::vector<native::QuantizedModule> one = {{"a.q_proj", quant::Format::parse("int4"), false},
                                              {"a.k_proj", quant::Format::parse("int4"), false}};
  auto q = native::make_quantization_config(one, {"lm_head"}, json::object());
  EXPECT_EQ(q["quant_method"], "compressed-tensors");
  EXPECT_EQ(q["format"], "pack-quantized");
  ASSERT_EQ(q["config_groups"].size(), 1u);
  EXPECT_EQ(q["config_groups"]["group_0"]["targets"], json::array({"Linear"}));
  EXPECT_EQ(q["ignore"], json::array({"lm_head"}));

  std::vector<native::QuantizedModule> mixed = {{"a.q_proj", quant::Format::parse("int4", 64), false},
                                                {"a.down_proj", quant::Format::parse("nf4"), false},
                                                {"a.k_proj", quant::Format::parse("int4", 64), false}};
  q = native::make_quantization_config(mixed, {}, json::object());
  EXPECT_EQ(q["quant_method"], "calq");  // nf4 has no compressed-tensors layout
  EXPECT_EQ(q["format"], "mixed-precision");
  ASSERT_EQ(q["config_groups"].size(), 2u);
  EXPECT_EQ(q["config_groups"]["group_0"]["targets"], json::array({"a.q_proj", "a.k_proj"}));
  EXPECT_EQ(q["config_groups"]["group_1"]["targets"], json::array({"a.down_proj"}));
}

TEST(Native, UnknownFormatNamesAreErrors) {
  EXPECT_THROW(native::format_from_args(json{{"num_bits", 4}, {"type", "int"}}, "marlin-24", "x"), Error);
  EXPECT_THROW(native::format_from_args(json::array(), "pack-quantized", "x"), Error);
}

}  // namespace
