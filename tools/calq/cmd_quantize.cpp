// calq quantize: checkpoint in, quantized calq directory out.
#include <fmt/format.h>

#include <filesystem>
#include <fstream>

#include "calq/backend/device.h"
#include "calq/engine/engine.h"
#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/pipeline/calibrated.h"
#include "calq/pipeline/quantize.h"
#include "commands.h"

namespace calq::cli {

namespace fs = std::filesystem;

namespace {

uint64_t parse_size(const std::string& s, const char* opt = "--max-shard-size") {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    fail("{} '{}': expected a size such as 5GB or 500MB", opt, s);
  }
  std::string unit = s.substr(used);
  double mul = 1;
  if (unit == "" || unit == "B") mul = 1;
  else if (unit == "KB" || unit == "K") mul = 1e3;
  else if (unit == "MB" || unit == "M") mul = 1e6;
  else if (unit == "GB" || unit == "G") mul = 1e9;
  else if (unit == "KiB") mul = 1024.0;
  else if (unit == "MiB") mul = 1024.0 * 1024;
  else if (unit == "GiB") mul = 1024.0 * 1024 * 1024;
  else fail("{} '{}': unknown unit '{}' (use B, KB, MB, GB, KiB, MiB, GiB)", opt, s, unit);
  CALQ_CHECK(v > 0, "{} '{}' must be positive", opt, s);
  return static_cast<uint64_t>(v * mul);
}

}  // namespace

Command add_quantize(CLI::App& app) {
  auto* sub = app.add_subcommand("quantize", "Quantize a model's linear weights and write a calq directory");
  struct Args {
    std::string input, output, method = "rtn", format = "int4", preset, on_indivisible = "error",
                                   shard = "5GB", device = "cpu", forward_device, devices, forward_precision,
                                   hessian_precision = "fp32", activation_precision = "fp32";
    int group = 0;
    bool asym = false, sym = false, clip = false, validate = false, overwrite = false, dry = false;
    int clip_grid = 20;
    float clip_min = 0.5f, clip_norm = 2.0f;
    std::vector<std::string> keep, overrides;
    // calibrated methods
    std::string calibration = "bartowski-v3", packing = "concatenate";
    size_t samples = 128, seq_len = 512;
    uint64_t seed = 0;
    int64_t calib_batch = 8, min_tokens = 16, block = 128, gpu_layers = -1;
    double damp = 0.01;
    bool act_order = false, no_static_groups = false, no_true_sequential = false, unquantized_inputs = false,
         offline = false;
    int act_grid = 20;
    bool no_clip = false;
    // long runs
    std::string work_dir, max_memory, layer_cache_memory;
    bool resume = false, layerwise = false, keep_work_dir = false;
    // MR-GPTQ and rotations
    std::string hadamard_block = "128";
    bool no_hadamard = false, scale_search = false;
    double kurtosis_threshold = 0, scale_search_p = 2.4;
    uint64_t hadamard_seed = 0;
    // mixture of experts
    std::string moe_calibration = "routed", moe_hessian = "per-expert", moe_token_weight = "routing",
                moe_min_tokens = "auto", moe_hessian_memory;
    int moe_threads = 0;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("-i,--input", a->input, "Input model directory (HF safetensors + config.json)")->required();
  sub->add_option("-o,--output", a->output, "Output directory (created atomically)")->required();
  sub->add_option("--method", a->method,
                  "rtn: round to nearest (with --calibration: activation-aware input scaling folded into the "
                  "preceding norm or rows); gptq: GPTQ with Hessians from calibration text (layer by layer, "
                  "true-sequential); mr-gptq: Hadamard rotation + scale search + act-order GPTQ (MR-GPTQ)")
      ->check(CLI::IsMember({"rtn", "gptq", "mr-gptq"}))
      ->capture_default_str();
  sub->add_option("--device", a->device,
                  "Where GPTQ runs (gptq, mr-gptq): cpu (default, the reference) or cuda (GPU 0: factorization, "
                  "column loop and block updates, and the calibration forward passes, on the GPU; docs/cuda.md)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  sub->add_option("--devices", a->devices,
                  "With --device cuda: the GPUs to use, as ordinals separated by commas (default 0). Modules that "
                  "are independent given their Hessians (q/k/v and gate/up of one input, the groups of a step, MoE "
                  "experts) are quantized with one worker per entry; the forward passes and the Hessians run on "
                  "the first. An ordinal may repeat (0,0: two modules at once on GPU 0). The output does not depend "
                  "on it for GPUs of one model");
  sub->add_option("--forward-device", a->forward_device,
                  "Where the calibration forward passes run (gptq, mr-gptq; default: --device): cpu, or cuda (the "
                  "GPU engine in fp32, MoE layers included). GPTQ's codes depend on the "
                  "last bits of the Hessians, so cpu with --device cuda reproduces a CPU run's output exactly, "
                  "while cuda is faster and of equal quality but not bit-identical (docs/cuda.md)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  sub->add_option("--forward-precision", a->forward_precision,
                  "Arithmetic of the GPU calibration forward passes (--forward-device cuda): fp32 (default; the "
                  "CPU engine's within 1e-5), bf16 (weights stored in bf16, each activation split into two bf16 "
                  "terms on the tensor cores with fp32 accumulation: 2.3x faster forward passes on Qwen3-8B shapes; "
                  "dequantized weights of finished layers are rounded to bf16) or bf16-fast (as bf16, but each "
                  "decoder-layer product's input rounded to one bf16 term: one GEMM instead of two, the "
                  "arithmetic of an fp16/bf16 PyTorch forward; logits ~5e-3 (rel RMS) from fp32) or exact (every "
                  "operation of the CPU engine in the CPU engine's order, on the CUDA cores: the CPU's bits, so with "
                  "the Hessians also exact (the default then) the output is byte-identical to --device cpu; slower "
                  "than fp32; llama-family models, MoE included, not GPT-2). docs/cuda.md")
      ->check(CLI::IsMember({"fp32", "bf16", "bf16-fast", "exact"}));
  sub->add_option("--gpu-layers", a->gpu_layers,
                  "Decoder layers whose weights the GPU holds at once during GPU calibration forward passes "
                  "(--forward-device cuda): default 1, each layer's weights go up when the layer loop reaches it "
                  "and the previous layer's are freed; 0 keeps the whole model on the GPU (uploaded at load). The "
                  "output does not depend on it")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--activation-precision", a->activation_precision,
                  "Calibration activations between decoder layers (gptq, mr-gptq): fp32 (default) or bf16 (rounded "
                  "to bf16, nearest even, at every layer boundary, on any device; the GPU keeps them in 2 bytes "
                  "instead of 4, halving the largest item of GPU calibration's memory at 128 x 2048 tokens; "
                  "docs/cuda.md)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
  sub->add_option("--hessian-precision", a->hessian_precision,
                  "Input precision of the Hessians' block products on the GPU (gptq, mr-gptq with --device cuda "
                  "and the forward passes on the GPU): fp32 (default; the CPU's precision and blocks), tf32 or bf16 (tensor "
                  "cores, fp32 accumulation per block, fp64 sum; faster, less exact: docs/cuda.md), or exact (the CPU's "
                  "blocks and order of the sums: its bits; the default with --forward-precision exact)")
      ->capture_default_str();
  sub->add_option("-f,--format", a->format,
                  "Element format: int2, int3, int4, int8, fp4 (E2M1 + fp16 group scales), nvfp4 "
                  "(E2M1, g16, E4M3 scales, fp32 tensor scale), mxfp4 (E2M1, g32, E8M0 scales), nf4, "
                  "fp8 (E4M3, per-channel fp32 scales)")
      ->capture_default_str();
  sub->add_option("-g,--group-size", a->group,
                  "Input elements per scale: 16, 32, 64, 128, 256, or -1 for per-channel "
                  "(default: 128; nvfp4 16; mxfp4 32; fp8 -1)");
  sub->add_flag("--symmetric", a->sym, "Symmetric integer quantization (default)");
  sub->add_flag("--asymmetric", a->asym, "Asymmetric integer quantization with a zero point per group");
  sub->add_option("--mixed-precision", a->preset,
                  "Group-size preset by module kind: dense, moe, quality, speed (see docs/cli.md)")
      ->check(CLI::IsMember({"dense", "moe", "quality", "speed"}));
  sub->add_option("--keep", a->keep, "Regex (searched in module names) of modules kept in their dtype; repeatable");
  sub->add_option("--override", a->overrides,
                  "REGEX=FORMAT[:GROUP]: modules matching REGEX use FORMAT (first match wins); repeatable");
  sub->add_flag("--clip-search", a->clip, "Search a clipping factor per group minimising the weight error");
  sub->add_option("--clip-grid", a->clip_grid, "Clip search: number of shrink factors tried")
      ->capture_default_str()->check(CLI::Range(2, 1000));
  sub->add_option("--clip-min", a->clip_min, "Clip search: smallest shrink factor")
      ->capture_default_str()->check(CLI::Range(0.05f, 1.0f));
  sub->add_option("--clip-norm", a->clip_norm, "Clip search: exponent p of the error sum |w - q(w)|^p")
      ->capture_default_str()->check(CLI::Range(1.0f, 8.0f));
  sub->add_option("--on-indivisible", a->on_indivisible,
                  "Modules whose in-features the group size does not divide: error, or keep them in their dtype")
      ->capture_default_str()->check(CLI::IsMember({"error", "keep"}));
  sub->add_flag("--validate", a->validate, "Measure per-tensor weight error (RMSE, relative Frobenius, max abs)");
  sub->add_flag("--overwrite", a->overwrite, "Replace the output directory if it exists");
  sub->add_flag("--dry-run", a->dry, "Print the plan (format of every tensor) and write nothing");
  sub->add_option("--max-shard-size", a->shard, "Largest output shard, e.g. 5GB, 500MB")->capture_default_str();
  auto* cal = "Calibration (gptq; rtn with activation statistics)";
  sub->add_option("--calibration", a->calibration,
                  "Calibration text: bartowski-v3, wikitext2[:split] (train by default), c4[:N], or a file "
                  "(docs/datasets.md). With --method rtn: enables activation-aware scaling; may also be an "
                  "activation_ranges.json from `calq calibrate` (or its directory)")
      ->capture_default_str()->group(cal);
  sub->add_option("--act-grid", a->act_grid,
                  "rtn with --calibration: number of exponents alpha in [0, 1) tried for the input scales")
      ->capture_default_str()->check(CLI::Range(1, 1000))->group(cal);
  sub->add_flag("--no-clip-search", a->no_clip,
                "rtn with --calibration: skip the clipping search (on by default there, its error weighted by "
                "each input channel's mean square)")->group(cal);
  sub->add_option("--samples", a->samples, "Calibration sequences")->capture_default_str()->group(cal);
  sub->add_option("--seq-len", a->seq_len, "Tokens per calibration sequence")->capture_default_str()->group(cal);
  sub->add_option("--seed", a->seed, "Seed of the calibration sample shuffle")->capture_default_str()->group(cal);
  sub->add_option("--packing", a->packing, "concatenate (token stream cut into sequences) or per-sample (padded)")
      ->check(CLI::IsMember({"concatenate", "per-sample"}))->capture_default_str()->group(cal);
  sub->add_option("--calib-batch", a->calib_batch, "Sequences per forward pass (memory)")->capture_default_str()->group(cal);
  sub->add_option("--min-tokens", a->min_tokens, "A module seeing fewer calibration tokens is an error")
      ->capture_default_str()->group(cal);
  sub->add_flag("--offline", a->offline, "Never download calibration data (also CALQ_OFFLINE=1)")->group(cal);
  auto* gq = "GPTQ";
  sub->add_option("--damp", a->damp, "Damping: lambda = damp * mean(diag H), added once")->capture_default_str()->group(gq);
  sub->add_option("--block-size", a->block, "Columns per lazy-update block")->capture_default_str()->group(gq);
  sub->add_flag("--act-order", a->act_order, "Quantize columns in decreasing order of the Hessian diagonal")->group(gq);
  sub->add_flag("--no-static-groups", a->no_static_groups,
                "With --act-order: groups follow the processing order and the output carries g_idx "
                "(default: static groups from the original column order)")->group(gq);
  sub->add_flag("--no-true-sequential", a->no_true_sequential,
                "Collect every module's Hessian of a layer in one pass (faster; later modules then see inputs "
                "of unquantized earlier ones)")->group(gq);
  sub->add_flag("--unquantized-inputs", a->unquantized_inputs,
                "Feed layer i the outputs of the unquantized layers < i (default: of the quantized ones)")->group(gq);

  auto* lr = "Long runs (gptq, mr-gptq; rtn with --calibration)";
  sub->add_option("--work-dir", a->work_dir,
                  "Per-layer checkpoints and spilled activations (default: OUTPUT.calq-work; removed after success)")
      ->group(lr);
  sub->add_flag("--resume", a->resume,
                "Continue an interrupted run from its work directory (same model and options; the output is "
                "byte-identical to an uninterrupted run)")->group(lr);
  sub->add_option("--max-memory", a->max_memory,
                  "RAM for calibration activations, e.g. 8GB (default: half of the available memory); the rest "
                  "is spilled to the work directory")->group(lr);
  sub->add_option("--layer-cache-memory", a->layer_cache_memory,
                  "gptq, mr-gptq with true-sequential passes: memory for the states a layer's passes share "
                  "(attention output, residual after attention, MLP activation), so that each pass starts after "
                  "the modules it did not change instead of at the layer's input; e.g. 2GB, 0 disables it. "
                  "Default: a quarter of the available RAM at each layer with CPU forward passes; with GPU "
                  "forward passes (states in GPU memory) only when given. The output does not depend on it")
      ->group(lr);
  sub->add_flag("--layerwise", a->layerwise,
                "Stream weights: read each layer from the checkpoint when it runs instead of caching fp32 "
                "weights (peak memory about one layer)")->group(lr);
  sub->add_flag("--keep-work-dir", a->keep_work_dir, "Keep the work directory after success")->group(lr);
  auto* mr = "MR-GPTQ and rotations";
  sub->add_option("--hadamard-block", a->hadamard_block,
                  "Hadamard rotation of the input dimension: block size (a power of two dividing every input "
                  "width) or full (one transform of the whole width, also m*2^k with m in 12, 20, 28, 40). "
                  "mr-gptq: default 128; rtn: given = RTN + rotation")
      ->capture_default_str()->group(mr);
  sub->add_flag("--no-hadamard", a->no_hadamard, "mr-gptq without rotation (scale search + act-order GPTQ only)")
      ->group(mr);
  sub->add_option("--hadamard-kurtosis-threshold", a->kurtosis_threshold,
                  "mr-gptq: rotate only modules whose calibration-input kurtosis exceeds K (Gaussian: 3)")
      ->group(mr);
  sub->add_option("--hadamard-seed", a->hadamard_seed, "Seed of the rotations' random sign vectors")
      ->capture_default_str()->group(mr);
  sub->add_option("--scale-search-p", a->scale_search_p,
                  "Scale search: exponent p of sum |w - q(w)|^p (mr-gptq; rtn with --scale-search)")
      ->capture_default_str()->check(CLI::Range(1.0, 8.0))->group(mr);
  sub->add_flag("--scale-search", a->scale_search,
                "rtn: MR-GPTQ's scale search (= --clip-search --clip-grid 100 --clip-min 0.2 --clip-norm P)")
      ->group(mr);

  auto* moe = "Mixture of experts (gptq, mr-gptq; docs/moe.md)";
  sub->add_option("--moe-calibration", a->moe_calibration,
                  "routed: each expert's Hessian from the tokens its router sends it; all-experts: every token is "
                  "also fed through every expert for statistics only (the layer's output still follows the router)")
      ->check(CLI::IsMember({"routed", "all-experts"}))->capture_default_str()->group(moe);
  sub->add_option("--moe-hessian", a->moe_hessian,
                  "per-expert: one Hessian per expert input; shared: one per layer and input position, pooled "
                  "over the experts (a baseline)")
      ->check(CLI::IsMember({"per-expert", "shared"}))->capture_default_str()->group(moe);
  sub->add_option("--moe-token-weight", a->moe_token_weight,
                  "routing: each routed token counts with its routing weight squared (the weight scales the "
                  "expert's output and its error); uniform: every routed token counts once")
      ->check(CLI::IsMember({"uniform", "routing"}))->capture_default_str()->group(moe);
  sub->add_option("--moe-min-tokens", a->moe_min_tokens,
                  "routed: an expert input with n < N routed tokens gets H = (n*H_routed + (N-n)*H_all)/N, H_all "
                  "from every token of the layer (an extra pass; the report lists these experts). auto: N = the "
                  "input's width; 0: only experts no token was routed to")
      ->capture_default_str()->group(moe);
  sub->add_option("--moe-hessian-memory", a->moe_hessian_memory,
                  "Memory for the expert Hessians of one step, e.g. 4GB (default: a quarter of the available "
                  "memory; with the Hessians on the GPU, a quarter of its free memory); above it experts are "
                  "processed in batches, one calibration pass each")
      ->group(moe);
  sub->add_option("--moe-threads", a->moe_threads, "Experts quantized in parallel (default 0: one per thread)")
      ->check(CLI::NonNegativeNumber)->group(moe);

  auto run = [a, sub]() -> int {
    pipeline::QuantizeOptions o;
    o.input = a->input;
    o.output = a->output;
    o.method = a->method;
    CALQ_CHECK(!(a->sym && a->asym), "--symmetric and --asymmetric are mutually exclusive");
    std::optional<int> group;
    if (sub->count("--group-size")) group = a->group;
    o.plan.format = with_context("--format", [&] { return quant::Format::parse(a->format, group, !a->asym); });
    o.plan.group_size_explicit = group.has_value();
    o.plan.preset = a->preset;
    o.plan.keep = a->keep;
    for (const auto& s : a->overrides) o.plan.overrides.push_back(pipeline::parse_override(s, !a->asym));
    o.plan.on_indivisible = a->on_indivisible == "keep" ? pipeline::OnIndivisible::Keep : pipeline::OnIndivisible::Error;
    o.rtn.clip_search = a->clip;
    o.rtn.clip_grid = a->clip_grid;
    o.rtn.clip_min = a->clip_min;
    o.rtn.clip_norm = a->clip_norm;
    o.validate = a->validate;
    o.overwrite = a->overwrite;
    o.dry_run = a->dry;
    o.max_shard_bytes = parse_size(a->shard);
    o.command_line = invocation();

    const bool act_rtn = a->method == "rtn" && sub->count("--calibration") > 0;
    const bool calibrated = a->method == "gptq" || a->method == "mr-gptq" || act_rtn;
    const bool on_cuda = backend::parse_device(a->device) == backend::Device::Cuda;
    CALQ_CHECK(!(on_cuda && a->method == "rtn"),
               "--device cuda applies to --method gptq and mr-gptq; --method rtn runs on the CPU (drop --device)");
    {
      // --hessian-precision: parsed (naming the option), then only where Hessians are on the GPU.
      const auto hp = backend::parse_hessian_precision(a->hessian_precision, "--hessian-precision");
      CALQ_CHECK(sub->count("--hessian-precision") == 0 || a->method == "gptq" || a->method == "mr-gptq",
                 "--hessian-precision applies to --method gptq and mr-gptq");
      if (hp != backend::HessianPrecision::F32) {
        CALQ_CHECK(on_cuda, "--hessian-precision {}: Hessians accumulate on the GPU only with --device cuda; with "
                            "--device cpu they are fp32 (drop --hessian-precision)",
                   a->hessian_precision);
        CALQ_CHECK(a->forward_device != "cpu",
                   "--hessian-precision {}: with --forward-device cpu the Hessians accumulate on the host in fp32 "
                   "(drop --forward-device cpu or --hessian-precision)",
                   a->hessian_precision);
      }
    }
    if (on_cuda) log_info("--device cuda: {}", backend::cuda_require("--device cuda"));
    const bool forward_cuda =
        a->forward_device.empty() ? on_cuda : backend::parse_device(a->forward_device, "--forward-device") == backend::Device::Cuda;
    CALQ_CHECK(a->forward_device.empty() || a->method == "gptq" || a->method == "mr-gptq",
               "--forward-device applies to --method gptq and mr-gptq");
    if (forward_cuda && !on_cuda) log_info("--forward-device cuda: {}", backend::cuda_require("--forward-device cuda"));
    CALQ_CHECK(a->forward_precision.empty() || forward_cuda,
               "--forward-precision applies to GPU forward passes (--device cuda or --forward-device cuda)");
    CALQ_CHECK(a->gpu_layers < 0 || forward_cuda,
               "--gpu-layers applies to GPU forward passes (--device cuda or --forward-device cuda)");
    CALQ_CHECK(a->devices.empty() || on_cuda, "--devices applies to --device cuda (got --device {})", a->device);
    CALQ_CHECK(sub->count("--activation-precision") == 0 || a->method == "gptq" || a->method == "mr-gptq",
               "--activation-precision applies to --method gptq and mr-gptq");
    CALQ_CHECK(sub->count("--layer-cache-memory") == 0 || a->method == "gptq" || a->method == "mr-gptq",
               "--layer-cache-memory applies to --method gptq and mr-gptq");
    CALQ_CHECK(sub->count("--layer-cache-memory") == 0 || !a->no_true_sequential,
               "--layer-cache-memory: with --no-true-sequential each layer runs one pass, there is nothing to share");
    std::vector<int> devices;
    if (!a->devices.empty()) devices = backend::cuda_parse_devices(a->devices, "--devices");
    if (a->method == "rtn") {
      for (const char* opt : {"--damp", "--act-order", "--block-size", "--no-static-groups", "--no-true-sequential",
                              "--unquantized-inputs"})
        CALQ_CHECK(sub->count(opt) == 0, "{} applies to --method gptq, not rtn", opt);
      if (!act_rtn)
        for (const char* opt : {"--samples", "--seq-len", "--seed", "--packing", "--calib-batch", "--min-tokens",
                                "--act-grid", "--work-dir", "--resume", "--max-memory", "--layerwise", "--keep-work-dir",
                                "--layer-cache-memory"})
          CALQ_CHECK(sub->count(opt) == 0, "{} needs calibration: add --calibration SOURCE (activation-aware RTN) or use "
                                           "--method gptq", opt);
      for (const char* opt : {"--moe-calibration", "--moe-hessian", "--moe-token-weight", "--moe-min-tokens",
                              "--moe-hessian-memory", "--moe-threads"})
        CALQ_CHECK(sub->count(opt) == 0, "{} applies to --method gptq and mr-gptq (rtn gives experts plain RTN)", opt);
    } else {
      CALQ_CHECK(sub->count("--act-grid") == 0, "--act-grid applies to --method rtn with --calibration");
    }
    const bool is_mr = a->method == "mr-gptq";
    std::optional<int64_t> hblock;
    if (a->hadamard_block == "full") hblock = 0;
    else {
      try {
        size_t used = 0;
        hblock = std::stoll(a->hadamard_block, &used);
        CALQ_CHECK(used == a->hadamard_block.size(), "");
      } catch (const std::exception&) {
        fail("--hadamard-block '{}': expected a power of two (16 .. 256 typical) or full", a->hadamard_block);
      }
      CALQ_CHECK(*hblock >= 2 && (*hblock & (*hblock - 1)) == 0,
                 "--hadamard-block {} must be a power of two (e.g. 16, 32, 64, 128, 256) or full", *hblock);
    }
    if (!is_mr) {
      for (const char* opt : {"--no-hadamard", "--hadamard-kurtosis-threshold"})
        CALQ_CHECK(sub->count(opt) == 0,
                   "{} applies to --method mr-gptq (it needs calibration data: the kurtosis of each module's "
                   "inputs), not {}",
                   opt, a->method);
      if (a->method == "gptq")
        for (const char* opt : {"--hadamard-block", "--hadamard-seed"})
          CALQ_CHECK(sub->count(opt) == 0, "{}: use --method mr-gptq for GPTQ with rotations", opt);
    }
    CALQ_CHECK(!(a->no_hadamard && (sub->count("--hadamard-block") || sub->count("--hadamard-kurtosis-threshold"))),
               "--no-hadamard contradicts --hadamard-block / --hadamard-kurtosis-threshold");
    if (a->method == "rtn") {
      if (sub->count("--hadamard-block")) {
        o.rotate_block = hblock;
        o.rotate_seed = a->hadamard_seed;
      } else {
        CALQ_CHECK(sub->count("--hadamard-seed") == 0, "--hadamard-seed needs --hadamard-block with --method rtn");
      }
      CALQ_CHECK(!(a->scale_search && a->clip), "--scale-search and --clip-search are exclusive (both pick the scale)");
      CALQ_CHECK(a->scale_search || sub->count("--scale-search-p") == 0, "--scale-search-p needs --scale-search with rtn");
      if (a->scale_search) {
        o.rtn.clip_search = true;
        o.rtn.clip_grid = 100;
        o.rtn.clip_min = 0.2f;
        o.rtn.clip_norm = static_cast<float>(a->scale_search_p);
      }
    } else {
      CALQ_CHECK(!a->scale_search, "--scale-search applies to --method rtn (mr-gptq always searches the scale)");
    }
    if (is_mr) CALQ_CHECK(!a->clip, "--clip-search: mr-gptq has its own scale search (--scale-search-p)");

    CALQ_CHECK(!(act_rtn && sub->count("--hadamard-block")),
               "--hadamard-block with --method rtn --calibration is not supported (rotation or activation scaling: "
               "choose one)");
    CALQ_CHECK(!(a->no_clip && !act_rtn), "--no-clip-search applies to --method rtn with --calibration");
    CALQ_CHECK(!(a->no_clip && a->clip), "--clip-search and --no-clip-search are mutually exclusive");
    if (act_rtn && !a->scale_search) o.rtn.clip_search = !a->no_clip;
    std::shared_ptr<pipeline::CalibratedResults> results;
    if (calibrated && !o.dry_run) {
      CALQ_CHECK(a->overwrite || !fs::exists(o.output),
                 "--output {} exists; pass --overwrite to replace it (checked before calibrating)", o.output.string());
      pipeline::CalibrationSpec calib;
      calib.source = a->calibration;
      calib.select.samples = a->samples;
      calib.select.seq_len = a->seq_len;
      calib.select.seed = a->seed;
      calib.select.packing = a->packing == "per-sample" ? data::Packing::PerSample : data::Packing::Concatenate;
      calib.batch = a->calib_batch;
      calib.load.allow_download = !a->offline;
      pipeline::RunStorage st;
      st.work_dir = a->work_dir.empty() ? fs::path(o.output.string() + ".calq-work") : fs::path(a->work_dir);
      st.max_memory = a->max_memory.empty() ? mem_available_bytes() / 2 : parse_size(a->max_memory, "--max-memory");
      st.resume = a->resume;
      st.overwrite = a->overwrite;
      st.layerwise = a->layerwise;
      st.bf16_activations = a->activation_precision == "bf16";
      if (!a->layer_cache_memory.empty())
        st.layer_cache_memory = a->layer_cache_memory == "0" ? 0 : parse_size(a->layer_cache_memory, "--layer-cache-memory");
      st.keep = a->keep_work_dir;
      // What must match for --resume (the plan and the calibration are checked separately).
      nlohmann::json identity = {{"method", a->method},
                                 {"format", o.plan.format.describe()},
                                 {"clip_search", o.rtn.clip_search || a->clip},
                                 {"clip_grid", a->clip_grid},
                                 {"clip_min", a->clip_min},
                                 {"clip_norm", a->clip_norm},
                                 {"min_tokens", a->min_tokens}};
      // The plan first (nothing written), then the calibrated pass on the modules it quantizes,
      // then the writer, which takes their results from the work directory.
      pipeline::QuantizeOptions dry = o;
      dry.dry_run = true;
      const auto plan = pipeline::quantize_model(dry).plan;
      if (a->method == "gptq" || is_mr) {
        pipeline::GptqPipelineOptions g;
        g.calib = calib;
        g.storage = st;
        g.min_tokens = a->min_tokens;
        g.gptq.damp = a->damp;
        g.gptq.block_size = a->block;
        g.gptq.act_order = a->act_order;
        g.gptq.static_groups = !a->no_static_groups;
        g.gptq.clip_search = a->clip;
        g.gptq.clip_grid = a->clip_grid;
        g.gptq.clip_min = a->clip_min;
        g.gptq.clip_norm = a->clip_norm;
        g.gptq.cuda = on_cuda;
        g.forward_cuda = forward_cuda;
        if (!a->forward_precision.empty())
          g.forward_precision = engine::parse_precision(a->forward_precision, "--forward-precision");
        g.devices = devices;
        if (a->gpu_layers >= 0) g.gpu_layers = a->gpu_layers;
        g.hessian_precision = backend::parse_hessian_precision(a->hessian_precision, "--hessian-precision");
        // Exact forward passes come with exact Hessians unless the user chose otherwise.
        if (sub->count("--hessian-precision") == 0 && forward_cuda && g.forward_precision == engine::Precision::Exact)
          g.hessian_precision = backend::HessianPrecision::Exact;
        g.true_sequential = !a->no_true_sequential;
        g.quantized_inputs = !a->unquantized_inputs;
        using Moe = pipeline::MoeCalibOptions;
        g.moe.calibration = a->moe_calibration == "all-experts" ? Moe::Calibration::AllExperts : Moe::Calibration::Routed;
        g.moe.hessian = a->moe_hessian == "shared" ? Moe::Hessian::Shared : Moe::Hessian::PerExpert;
        g.moe.token_weight = a->moe_token_weight == "uniform" ? Moe::TokenWeight::Uniform : Moe::TokenWeight::Routing;
        if (a->moe_min_tokens != "auto") {
          size_t used = 0;
          int64_t n = -1;
          try {
            n = std::stoll(a->moe_min_tokens, &used);
          } catch (const std::exception&) {
            used = 0;
          }
          CALQ_CHECK(used == a->moe_min_tokens.size() && n >= 0,
                     "--moe-min-tokens '{}': expected auto or a token count >= 0", a->moe_min_tokens);
          g.moe.min_tokens = n;
        }
        if (!a->moe_hessian_memory.empty())
          g.moe.hessian_memory = parse_size(a->moe_hessian_memory, "--moe-hessian-memory");
        g.moe.threads = a->moe_threads;
        if (is_mr) {
          g.mr.enabled = true;
          g.mr.rotate = !a->no_hadamard;
          g.mr.hadamard_block = *hblock;
          g.mr.seed = a->hadamard_seed;
          if (sub->count("--hadamard-kurtosis-threshold")) g.mr.kurtosis_threshold = a->kurtosis_threshold;
          g.mr.scale_search_p = a->scale_search_p;
          if (g.mr.rotate) pipeline::check_rotation_plan(plan, g.mr.hadamard_block);  // before calibrating
        }
        identity["gptq"] = {{"damp", g.gptq.damp},
                            {"block_size", g.gptq.block_size},
                            {"act_order", g.gptq.act_order},
                            {"static_groups", g.gptq.static_groups},
                            {"true_sequential", g.true_sequential},
                            {"quantized_inputs", g.quantized_inputs},
                            {"forward_device", forward_cuda ? "cuda" : "cpu"},
                            {"forward_precision",
                             engine::precision_name(forward_cuda ? g.forward_precision : engine::Precision::F32)},
                            {"hessian_precision", a->hessian_precision}};
        // Only when not the default, so that work directories of earlier runs still resume.
        if (st.bf16_activations) identity["gptq"]["activation_precision"] = "bf16";
        identity["moe"] = {{"calibration", a->moe_calibration},
                           {"hessian", a->moe_hessian},
                           {"token_weight", a->moe_token_weight},
                           {"min_tokens", g.moe.min_tokens}};
        if (is_mr)
          identity["mr_gptq"] = {{"hadamard", g.mr.rotate},
                                 {"block", g.mr.hadamard_block},
                                 {"seed", g.mr.seed},
                                 {"kurtosis_threshold", g.mr.kurtosis_threshold ? nlohmann::json(*g.mr.kurtosis_threshold)
                                                                                : nlohmann::json(nullptr)},
                                 {"scale_search_p", g.mr.scale_search_p}};
        results = std::make_shared<pipeline::CalibratedResults>(
            pipeline::run_gptq(o.input, plan, g, identity, o.report_extra));
        o.rotations = results->rotations_by_module();
        o.config_extra = {{"gptq", {{"damp", g.gptq.damp}, {"act_order", g.gptq.act_order},
                                    {"static_groups", g.gptq.static_groups}, {"calibration", a->calibration},
                                    {"samples", a->samples}, {"seq_len", a->seq_len}}}};
        if (is_mr) o.config_extra["mr_gptq"] = o.report_extra["mr_gptq"];
      } else {
        pipeline::ActRtnOptions ar;
        ar.calib = calib;
        ar.storage = st;
        ar.min_tokens = a->min_tokens;
        ar.act.grid = a->act_grid;
        ar.act.rtn = o.rtn;
        fs::path src = a->calibration;
        if (fs::is_directory(src) && fs::exists(src / "activation_ranges.json")) src /= "activation_ranges.json";
        if (fs::is_regular_file(src) && src.extension() == ".json") {
          std::ifstream f(src);
          std::string head(4096, '\0');
          f.read(head.data(), static_cast<std::streamsize>(head.size()));
          if (head.find("\"detailed_stats\"") != std::string::npos || head.find("\"layer_ranges\"") != std::string::npos)
            ar.stats_file = src;
        }
        identity["act_grid"] = a->act_grid;
        results = std::make_shared<pipeline::CalibratedResults>(
            pipeline::run_act_rtn(o.input, plan, ar, identity, o.report_extra));
        o.config_extra = {{"act_scale", {{"grid", a->act_grid}, {"calibration", a->calibration}}}};
        if (ar.stats_file.empty()) {
          o.config_extra["act_scale"]["samples"] = a->samples;
          o.config_extra["act_scale"]["seq_len"] = a->seq_len;
        }
      }
      o.quantizer = [results](const pipeline::TensorPlan& p) -> std::optional<quant::QuantizedWeight> {
        return results->weight(p);
      };
      o.with_g_idx = [results](const pipeline::TensorPlan& p) { return results->has_g_idx(p); };
      o.replace = [results](const pipeline::TensorPlan& p) { return results->replaced(p.name); };
      if (act_rtn) o.method = "rtn+act";
    }
    auto r = pipeline::quantize_model(o);
    if (results) {
      if (a->keep_work_dir) log_info("work directory kept: {}", results->work_dir().path().string());
      else results->work_dir().remove();
    }
    size_t nq = 0;
    for (const auto& p : r.plan) nq += p.format ? 1 : 0;
    if (o.dry_run) {
      fmt::print("{:<60} {:<16} {:<18} {}\n", "tensor", "shape", "format", "reason");
      for (const auto& p : r.plan) {
        std::string shape = shape_str(p.shape);
        fmt::print("{:<60} {:<16} {:<18} {}\n", p.name, shape,
                   p.format ? p.format->describe() : std::string("keep ") + std::string(dtype_name(p.dtype)), p.reason);
      }
      fmt::print("{} tensors: {} quantized, {} kept (dry run, nothing written)\n", r.plan.size(), nq,
                 r.plan.size() - nq);
      return 0;
    }
    if (o.validate) {
      fmt::print("{:<60} {:<16} {:>12} {:>12} {:>12}\n", "tensor", "format", "rmse", "rel_fro", "max_abs");
      for (const auto& t : r.tensors)
        if (t.validated)
          fmt::print("{:<60} {:<16} {:>12.4e} {:>12.4e} {:>12.4e}\n", t.name, t.format, t.error.rmse,
                     t.error.rel_fro, t.error.max_abs);
    }
    const auto& rep = r.report;
    fmt::print("quantized {} of {} tensors ({} of {} parameters) at {:.3f} bits/weight in {:.1f} s; "
               "tensor bytes {} -> {}; peak RSS {}\n",
               nq, r.plan.size(), rep["quantized_params"].get<uint64_t>(), rep["total_params"].get<uint64_t>(),
               rep["bits_per_weight_quantized"].get<double>(), r.seconds,
               format_bytes(rep["input_bytes"].get<double>()), format_bytes(rep["output_tensor_bytes"].get<double>()),
               format_bytes(static_cast<double>(rep["peak_rss_bytes"].get<uint64_t>())));
    fmt::print("wrote {}\n", o.output.string());
    return 0;
  };
  return {sub, run};
}

}  // namespace calq::cli
