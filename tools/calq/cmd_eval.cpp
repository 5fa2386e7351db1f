// calq eval: perplexity, KL divergence against a reference model (or its saved log-probabilities)
// and per-module layer error, on the CPU engine or (perplexity, KL divergence) the GPU forward
// pass (--device cuda, docs/cuda.md).
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/data/dataset.h"
#include "calq/engine/engine.h"
#include "calq/eval/driver.h"
#include "calq/io/atomic.h"
#include "calq/pipeline/calibrated.h"
#include "calq/text/tokenizer.h"
#include "commands.h"

namespace calq::cli {

namespace fs = std::filesystem;

namespace {

struct EvalArgs {
  std::string model, reference, metric = "perplexity", dataset = "wikitext2", method = "llama", save_logits,
              reference_logits, json_out, calibration = "bartowski-v3", field = "text",
              device = "cpu", gpu_precision;
  int64_t ctx = 512, chunks = -1, stride = 0, samples = 16, seq_len = 512, batch = 0, gpu_layers = -1;
  bool allow_long = false, offline = false;
};

// A forward function over the engine: one window, the logits of rows [first, n).
eval::ForwardFn engine_forward(engine::Model& m) {
  return [&m](const std::vector<int32_t>& input, int64_t first, std::vector<float>& logits) {
    engine::Batch b;
    b.batch = 1;
    b.seq = static_cast<int64_t>(input.size());
    b.tokens = input;
    logits = m.logits_from(b, first);
  };
}

// Several windows of equal length in one batched forward pass.
eval::BatchForwardFn engine_batch_forward(engine::Model& m) {
  return [&m](const std::vector<const std::vector<int32_t>*>& inputs, int64_t first, std::vector<float>& logits) {
    engine::Batch b;
    b.batch = static_cast<int64_t>(inputs.size());
    b.seq = static_cast<int64_t>(inputs.front()->size());
    for (auto* in : inputs) b.tokens.insert(b.tokens.end(), in->begin(), in->end());
    logits = m.logits_from(b, first);
  };
}

std::vector<eval::Window> make_windows(const EvalArgs& a, const text::Tokenizer& tok, const std::string& document) {
  std::vector<int32_t> ids = tok.encode(document, true);
  if (a.method == "llama") {
    std::optional<int32_t> bos;
    if (tok.adds_bos()) bos = tok.bos_id();
    return eval::llama_chunks(ids, a.ctx, a.chunks, bos);
  }
  return eval::stride_windows(ids, a.ctx, a.stride > 0 ? a.stride : a.ctx / 2, a.chunks);
}

engine::Model load_engine(const std::string& dir, const EvalArgs& a) {
  engine::Options o;
  o.allow_long_context = a.allow_long;
  o.device = backend::parse_device(a.device);
  if (o.device == backend::Device::Cuda) {
    log_info("--device cuda: {}", backend::cuda_require("--device cuda"));
    o.gpu_precision = engine::parse_precision(a.gpu_precision.empty() ? "fp32" : a.gpu_precision);
    o.gpu_resident_layers = a.gpu_layers > 0 ? a.gpu_layers : 0;
  }
  // Every chunk reuses every weight: keep the fp32 copies when they fit in half the free memory
  // (on the GPU the weights live in GPU memory instead).
  if (o.device == backend::Device::Cpu) {
    auto probe = native::Model::open(dir);
    uint64_t params = 0;
    for (const auto& e : probe.entries()) params += static_cast<uint64_t>(shape_numel(e.shape));
    o.cache_weights = 4 * params < mem_available_bytes() / 2;
  }
  auto m = engine::Model::load(dir, o);
  const auto& c = m.config();
  CALQ_CHECK(a.allow_long || a.ctx <= c.max_position_embeddings,
             "--ctx {} is longer than {} supports (max_position_embeddings {}); use --allow-long-context to run anyway",
             a.ctx, dir, c.max_position_embeddings);
  return m;
}

void put_common(nlohmann::json& j, const EvalArgs& a, size_t windows, double seconds) {
  j["ctx"] = a.ctx;
  j["chunks"] = windows;
  j["seconds"] = seconds;
  j["method"] = a.method;
  j["dataset"] = a.dataset;
}

int run_eval(const EvalArgs& a) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  data::LoadOptions lo;
  lo.allow_download = !a.offline;
  lo.text_field = a.field;
  lo.wikitext_default_split = "test";
  CALQ_CHECK(a.ctx >= 4, "--ctx must be at least 4, got {}", a.ctx);
  CALQ_CHECK(a.chunks == -1 || a.chunks >= 1, "--chunks must be at least 1, got {}", a.chunks);
  nlohmann::json j;
  j["metric"] = a.metric;
  j["model"] = a.model;

  // Device errors (bad value, no CUDA build, no GPU) before any work.
  const bool on_cuda = backend::parse_device(a.device) == backend::Device::Cuda;
  if (!a.gpu_precision.empty()) {
    engine::parse_precision(a.gpu_precision);
    CALQ_CHECK(on_cuda, "--gpu-precision {} applies to --device cuda only", a.gpu_precision);
  }
  CALQ_CHECK(a.gpu_layers < 0 || on_cuda, "--gpu-layers applies to --device cuda only");
  if (on_cuda) backend::cuda_require("--device cuda");
  if (a.metric == "layer-error") {
    CALQ_CHECK(a.device == "cpu", "--device {}: --metric layer-error runs on the CPU only; drop --device",
               a.device);
    CALQ_CHECK(!a.reference.empty(), "--metric layer-error needs --reference BASE (the unquantized model)");
    pipeline::CalibrationSpec spec;
    spec.source = a.calibration;
    spec.select.samples = static_cast<size_t>(a.samples);
    spec.select.seq_len = static_cast<size_t>(a.seq_len);
    spec.load = lo;
    spec.load.wikitext_default_split = "train";
    auto rows = pipeline::layer_error(a.model, a.reference, spec);
    fmt::print("{:<48} {:>12} {:>10}\n", "module", "rel. error", "tokens");
    nlohmann::json arr = nlohmann::json::array();
    for (auto& r : rows) {
      fmt::print("{:<48} {:>12.6f} {:>10}\n", r.module, r.rel_error, r.tokens);
      arr.push_back({{"module", r.module}, {"rel_error", r.rel_error}, {"tokens", r.tokens}});
    }
    j["modules"] = arr;
    j["seconds"] = std::chrono::duration<double>(clock::now() - t0).count();
    if (!a.json_out.empty()) io::write_file_atomic(a.json_out, j.dump(2) + "\n");
    return 0;
  }

  auto tok = text::load_tokenizer(a.model);
  const auto ds = data::Dataset::load(a.dataset, lo);
  const auto windows = make_windows(a, *tok, ds.document);
  auto m = load_engine(a.model, a);
  const int64_t vocab = m.config().vocab_size;
  CALQ_CHECK(tok->vocab_size() <= vocab, "the tokenizer has {} tokens but {} has vocab_size {}", tok->vocab_size(),
             a.model, vocab);
  auto fwd = engine_forward(m);
  eval::RunOptions ro;
  CALQ_CHECK(a.batch >= 0, "--batch must be at least 1 (or 0: automatic), got {}", a.batch);
  // Automatic: one chunk per thread (at least 4, at most 16), so the engine's sequence-parallel
  // layers keep every thread busy; batching never changes the results.
  // On the GPU, 16 chunks per pass.
  ro.batch = a.batch > 0 ? a.batch
             : a.device == "cuda" ? 16
                                  : std::clamp<int64_t>(omp_get_max_threads(), 4, 16);
  ro.batch_fn = engine_batch_forward(m);
  eval::RunStats st;
  log_info("{}: {} chunks of {} tokens ({} method), {}", a.model, windows.size(), a.ctx, a.method,
           a.device == "cuda" ? fmt::format("GPU forward pass ({}), batch {}", a.gpu_precision.empty() ? "fp32" : a.gpu_precision, ro.batch)
                              : fmt::format("{} threads", omp_get_max_threads()));

  if (a.metric == "perplexity") {
    ro.label = "perplexity";
    auto r = eval::run_perplexity(windows, vocab, fwd, ro, &st);
    fmt::print("PPL = {:.4f} ± {:.5f} over {} tokens ({} chunks of {}); {:.1f} tokens/s\n", r.ppl, r.ppl_err, r.tokens,
               windows.size(), a.ctx, static_cast<double>(st.tokens_processed) / st.seconds);
    j["ppl"] = r.ppl;
    j["ppl_stderr"] = r.ppl_err;
    j["tokens_scored"] = r.tokens;
    j["tokens_per_second"] = static_cast<double>(st.tokens_processed) / st.seconds;
    put_common(j, a, windows.size(), st.seconds);
  } else {  // kl-divergence
    const bool saving = !a.save_logits.empty();
    CALQ_CHECK(saving + !a.reference.empty() + !a.reference_logits.empty() == 1,
               "--metric kl-divergence needs exactly one of --reference BASE, --reference-logits FILE, or "
               "--save-logits FILE (run on the base model)");
    eval::LogitsHeader h;
    h.vocab = vocab;
    h.ctx = a.ctx;
    h.stride = a.method == "stride" ? (a.stride > 0 ? a.stride : a.ctx / 2) : 0;
    h.windows = static_cast<int64_t>(windows.size());
    h.method = a.method;
    h.windows_sha256 = eval::windows_digest(windows);
    h.model = fs::absolute(a.model).string();
    h.tokenizer = tok->describe();
    if (saving) {
      eval::LogitsWriter w(a.save_logits, h);
      ro.label = "save logits";
      auto r = eval::save_logprobs(windows, vocab, fwd, w, ro, &st);
      fmt::print("saved log-probabilities of {} tokens ({} chunks) to {}; PPL(base) = {:.4f} ± {:.5f}\n", r.tokens,
                 windows.size(), a.save_logits, r.ppl, r.ppl_err);
      j["ppl"] = r.ppl;
      j["ppl_stderr"] = r.ppl_err;
      j["tokens_scored"] = r.tokens;
      put_common(j, a, windows.size(), st.seconds);
    } else {
      eval::KldResult r;
      ro.label = "kl-divergence";
      if (!a.reference.empty()) {
        auto rtok = text::load_tokenizer(a.reference);
        const auto rwin = make_windows(a, *rtok, ds.document);
        CALQ_CHECK(eval::windows_digest(rwin) == h.windows_sha256,
                   "the reference {} tokenizes the text differently from {} (different tokenizer): KL divergence "
                   "needs the same tokens",
                   a.reference, a.model);
        auto base = load_engine(a.reference, a);
        CALQ_CHECK(base.config().vocab_size == vocab, "the reference has vocab_size {}, {} has {}: not comparable",
                   base.config().vocab_size, a.model, vocab);
        auto bf = engine_forward(base);
        r = eval::run_kl_divergence(windows, vocab, fwd, {&bf, nullptr}, ro, &st);
      } else {
        eval::LogitsReader rd(a.reference_logits);
        const auto& rh = rd.header();
        CALQ_CHECK(rh.vocab == vocab, "{} was saved from a model with vocab {}, {} has {}", a.reference_logits,
                   rh.vocab, a.model, vocab);
        CALQ_CHECK(rh.windows_sha256 == h.windows_sha256,
                   "{} was saved for other tokens (text, tokenizer, --ctx {}, --chunks, method {}): rerun "
                   "--save-logits with this run's settings",
                   a.reference_logits, rh.ctx, rh.method);
        r = eval::run_kl_divergence(windows, vocab, fwd, {nullptr, &rd}, ro, &st);
      }
      std::cout << r.table();
      fmt::print("tokens scored: {} ({} chunks of {}); {:.1f} tokens/s\n", r.tokens, windows.size(), a.ctx,
                 static_cast<double>(st.tokens_processed) / st.seconds);
      const nlohmann::json rj = r.to_json();
      for (auto& [k, v] : rj.items()) j[k] = v;
      put_common(j, a, windows.size(), st.seconds);
    }
  }
  if (!a.json_out.empty()) io::write_file_atomic(a.json_out, j.dump(2) + "\n");
  return 0;
}

}  // namespace

Command add_eval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* c = app.add_subcommand("eval", "Perplexity, KL divergence against a reference, or per-module layer error");
  c->add_option("--model,-m", a->model, "Model directory (Hugging Face checkpoint or calq output)")->required();
  c->add_option("--metric", a->metric, "perplexity, kl-divergence or layer-error")
      ->check(CLI::IsMember({"perplexity", "kl-divergence", "layer-error"}))
      ->capture_default_str();
  c->add_option("--reference,-r", a->reference, "The base model (kl-divergence, layer-error)");
  c->add_option("--dataset,-d", a->dataset,
                "Evaluation text: wikitext2 (test split), wikitext2:validation, c4, bartowski-v3, or a file")
      ->capture_default_str();
  c->add_option("--field", a->field, "JSON/JSONL text field of a --dataset file")->capture_default_str();
  c->add_option("--ctx,-c", a->ctx, "Tokens per chunk (context)")->capture_default_str();
  c->add_option("--chunks", a->chunks, "Evaluate only the first N chunks (default: all)");
  c->add_option("--method", a->method,
                "llama: non-overlapping chunks, second half scored (llama.cpp); stride: sliding window")
      ->check(CLI::IsMember({"llama", "stride"}))
      ->capture_default_str();
  c->add_option("--stride", a->stride, "Window step of --method stride (default ctx/2)");
  c->add_option("--save-logits", a->save_logits, "kl-divergence on the base model: save its log-probabilities here");
  c->add_option("--reference-logits", a->reference_logits, "kl-divergence: the base's saved log-probabilities");
  c->add_option("--json", a->json_out, "Also write the results as flat JSON to this file");
  c->add_option("--calibration", a->calibration, "layer-error: calibration source")->capture_default_str();
  c->add_option("--samples", a->samples, "layer-error: calibration sequences")->capture_default_str();
  c->add_option("--seq-len", a->seq_len, "layer-error: tokens per calibration sequence")->capture_default_str();
  c->add_option("--batch", a->batch,
                "Chunks per forward pass (weights are read once per batch); 0: one per thread, 4 to 16")
      ->capture_default_str();
  c->add_option("--device", a->device,
                "cpu (the reference) or cuda: the forward passes of perplexity and kl-divergence on GPU 0 (llama, "
                "mistral, qwen2, qwen3, gpt2, qwen3_moe, mixtral; docs/cuda.md)")
      ->capture_default_str();
  c->add_option("--gpu-precision", a->gpu_precision,
                "With --device cuda: fp32 (fp32 weights and products, default), bf16 (bf16 weights, half the "
                "GPU memory; products on the tensor cores with fp32 accumulation, each input as two bf16 terms) or "
                "bf16-fast (each decoder-layer product's input rounded to one bf16 term: one GEMM instead of two) or "
                "exact (the CPU engine's operations in its order: the CPU's logits bit for bit; slower; "
                "llama-family models, MoE included, not GPT-2)");
  c->add_option("--gpu-layers", a->gpu_layers,
                "With --device cuda: decoder layers whose weights the GPU holds at once (default 0: the whole "
                "model, uploaded at load; N: each batch uploads the layers beyond the N most recently run, for "
                "models larger than the GPU's memory, slower)")
      ->check(CLI::NonNegativeNumber);
  c->add_flag("--allow-long-context", a->allow_long, "Allow --ctx beyond max_position_embeddings");
  c->add_flag("--offline", a->offline, "Never download datasets (also CALQ_OFFLINE=1)");
  return {c, [a]() { return run_eval(*a); }};
}

}  // namespace calq::cli
