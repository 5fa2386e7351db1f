// calq generate-model: a random-weight checkpoint of a real config (tests, demos, benchmarks).
#include "calq/core/error.h"
#include "calq/io/config.h"
#include "calq/model/synth.h"
#include "commands.h"

namespace calq::cli {

Command add_generate(CLI::App& app) {
  auto* sub = app.add_subcommand("generate-model",
                                 "Write a random-weight checkpoint for a config.json (streamed, any size)");
  struct Args {
    std::string config, output, dtype = "bf16";
    uint64_t seed = 0;
    float std = 0.02f, outlier_rate = 0.f, outlier_scale = 10.f;
    int layers = 0;
    bool overwrite = false;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("-c,--config", a->config, "config.json, or a directory holding one")->required();
  sub->add_option("-o,--output", a->output, "Output directory")->required();
  sub->add_option("--dtype", a->dtype, "Weight dtype: bf16, fp16, fp32")
      ->capture_default_str()->check(CLI::IsMember({"bf16", "fp16", "fp32"}));
  sub->add_option("--seed", a->seed, "Random seed")->capture_default_str();
  sub->add_option("--std", a->std, "Standard deviation of the weights")->capture_default_str();
  sub->add_option("--outlier-rate", a->outlier_rate,
                  "Fraction of input channels of each matrix scaled by --outlier-scale")->capture_default_str();
  sub->add_option("--outlier-scale", a->outlier_scale, "Scale of outlier channels")->capture_default_str();
  sub->add_option("--layers", a->layers, "Override num_hidden_layers (smaller test models)")->check(CLI::PositiveNumber);
  sub->add_flag("--overwrite", a->overwrite, "Replace the output directory if it exists");
  auto run = [a]() -> int {
    std::filesystem::path p = a->config;
    if (std::filesystem::is_directory(p)) p /= "config.json";
    auto raw = io::load_config_json(p);
    if (a->layers > 0) {
      if (raw.contains("n_layer")) raw["n_layer"] = a->layers;
      else raw["num_hidden_layers"] = a->layers;
      if (raw.contains("layer_types") && raw["layer_types"].is_array()) {
        auto lt = raw["layer_types"];
        raw["layer_types"] = nlohmann::json::array();
        for (int i = 0; i < a->layers; ++i) raw["layer_types"].push_back(lt.empty() ? "full_attention" : lt[std::min<size_t>(i, lt.size() - 1)]);
      }
    }
    auto cfg = io::parse_config(raw, p.string());
    model::SynthOptions o;
    o.dtype = a->dtype == "bf16" ? DType::BF16 : a->dtype == "fp16" ? DType::F16 : DType::F32;
    o.seed = a->seed;
    o.std = a->std;
    o.outlier_rate = a->outlier_rate;
    o.outlier_scale = a->outlier_scale;
    o.overwrite = a->overwrite;
    model::write_random_model(cfg, a->output, o);
    return 0;
  };
  return {sub, run};
}

}  // namespace calq::cli
