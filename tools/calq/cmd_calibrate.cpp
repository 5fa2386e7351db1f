// calq calibrate: activation statistics (and optionally Hessians and an imatrix) from calibration
// text run through the model layer by layer.
#include <fmt/format.h>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/pipeline/calibrated.h"
#include "commands.h"

namespace calq::cli {

Command add_calibrate(CLI::App& app) {
  struct Args {
    std::string input, output, calibration = "bartowski-v3", imatrix, packing = "concatenate";
    size_t samples = 128, seq_len = 512;
    uint64_t seed = 0;
    int64_t batch = 8;
    double percentile = 99.9, smooth = 0.8;
    bool hessians = false, overwrite = false, offline = false;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("calibrate",
                               "Run calibration text through a model and write per-module activation statistics "
                               "(activation_ranges.json, ranges_minmax.json), optionally Hessians and an imatrix");
  c->add_option("--input,-i", a->input, "Model directory")->required();
  c->add_option("--output,-o", a->output, "Output directory (created atomically)")->required();
  c->add_option("--calibration", a->calibration,
                "bartowski-v3, wikitext2[:split] (train by default), c4[:N], or a file (docs/datasets.md)")
      ->capture_default_str();
  c->add_option("--samples", a->samples, "Calibration sequences")->capture_default_str();
  c->add_option("--seq-len", a->seq_len, "Tokens per sequence")->capture_default_str();
  c->add_option("--seed", a->seed, "Seed of the sample shuffle")->capture_default_str();
  c->add_option("--packing", a->packing, "concatenate or per-sample")
      ->check(CLI::IsMember({"concatenate", "per-sample"}))
      ->capture_default_str();
  c->add_option("--batch", a->batch, "Sequences per forward pass")->capture_default_str();
  c->add_option("--percentile", a->percentile, "Percentile of |x| reported per module (histogram, <= 1.1% high)")
      ->capture_default_str();
  c->add_option("--smooth-factor", a->smooth, "Recorded in activation_ranges.json (seed schema)")->capture_default_str();
  c->add_flag("--hessians", a->hessians, "Also write H = X^T X / n per distinct input (hessians.safetensors, fp64)");
  c->add_option("--imatrix", a->imatrix, "Also write a llama.cpp importance matrix (GGUF) to this file");
  c->add_flag("--overwrite", a->overwrite, "Replace the output directory");
  c->add_flag("--offline", a->offline, "Never download calibration data");
  return {c, [a]() -> int {
            CALQ_CHECK(a->percentile > 0 && a->percentile <= 100, "--percentile must be in (0, 100], got {}",
                       a->percentile);
            pipeline::CalibrateOptions o;
            o.input = a->input;
            o.output = a->output;
            o.calib.source = a->calibration;
            o.calib.select.samples = a->samples;
            o.calib.select.seq_len = a->seq_len;
            o.calib.select.seed = a->seed;
            o.calib.select.packing =
                a->packing == "per-sample" ? data::Packing::PerSample : data::Packing::Concatenate;
            o.calib.batch = a->batch;
            o.calib.load.allow_download = !a->offline;
            o.percentile = a->percentile;
            o.smooth_factor = a->smooth;
            o.hessians = a->hessians;
            o.imatrix = a->imatrix;
            o.overwrite = a->overwrite;
            o.command_line = invocation();
            auto rep = pipeline::calibrate_model(o);
            fmt::print("calibrated {} modules on {} tokens in {:.1f} s; wrote {}{}\n", rep["modules"].get<size_t>(),
                       rep["calibration"]["tokens"].get<int64_t>(), rep["seconds"].get<double>(), a->output,
                       a->imatrix.empty() ? "" : " and " + a->imatrix);
            return 0;
          }};
}

}  // namespace calq::cli
