// The GPU forward pass of engine::Model (Options::device = Cuda): the decoder layers of llama,
// mistral, qwen2, qwen3, gpt2 and the MoE architectures qwen3_moe and mixtral on GPU 0, the
// residual stream resident on the device. Interface in src/calq/engine/gpu.h, kernels in
// engine_kernels.cu, docs/cuda.md "Forward pass".
//
// Per layer, as the CPU engine (engine.cpp, run_llama_layer): RMSNorm → q/k/v projections (+bias)
// → qk-norm → RoPE → causal GQA attention (sliding window where the CPU applies one) → o_proj →
// residual add → RMSNorm → gate/up → SiLU·up → down → residual add. A sparse MoE layer replaces
// the MLP by the CPU's Impl::moe: router product → softmax / top-k (a kernel) → the choice to the
// host, which groups the rows by expert → per expert, in expert order: gather of its rows, its
// gate/up/down products, weighted scatter-add into the residual stream. Products are cuBLAS: fp32
// (cublasSgemm, CUBLAS_DEFAULT_MATH: no TF32) or bf16 weights × the input split into two bf16
// terms (hi + lo), fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F). An observer gets each linear
// group's input (the fp32 input, before the bf16 split) on the device when it takes device
// inputs (Observer::device_input), else a host copy; an input transform runs on a host copy,
// which is then uploaded and multiplied. Precision::Exact replaces the products, RMSNorm, SiLU·up
// and attention by the kernels of exact_kernels.cu, which follow the CPU engine's order of
// operations (llama-family layers, MoE included; not GPT-2), so that the GPU gives the CPU's bits.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "calq/backend/cuda/engine_kernels.h"
#include "calq/backend/cuda/exact_kernels.h"
#include "calq/backend/cuda/check.h"
#include "calq/backend/cuda/memory.h"
#include "calq/backend/device.h"
#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/engine/gpu.h"

namespace calq::engine::gpu {

namespace {

namespace k = calq::backend::cuda;
using k::check_cuda;
using k::check_cublas;

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// Free device memory, capped by CALQ_CUDA_MEMORY_LIMIT (bytes; for tests of the out-of-memory
// error).
size_t free_bytes(size_t* total = nullptr) {
  size_t f = 0, t = 0;
  check_cuda(cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
  if (const char* lim = std::getenv("CALQ_CUDA_MEMORY_LIMIT"); lim && *lim) {
    const size_t cap = static_cast<size_t>(std::strtoull(lim, nullptr, 10));
    f = std::min(f, cap);
  }
  if (total) *total = t;
  return f;
}

class DevMem {
 public:
  DevMem() = default;
  DevMem(const DevMem&) = delete;
  DevMem& operator=(const DevMem&) = delete;
  DevMem(DevMem&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  DevMem& operator=(DevMem&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DevMem() { reset(); }
  void reset() {
    k::tracked_free(p_, bytes_);
    p_ = nullptr;
    bytes_ = 0;
  }
  // At least `bytes` (contents not kept when it grows). `what` and `hint` go into the
  // out-of-memory error.
  void ensure(size_t bytes, const char* what, const char* hint) {
    if (bytes <= bytes_ && p_) return;
    reset();
    const size_t f = free_bytes();
    if (bytes > f || k::tracked_malloc(&p_, bytes) != cudaSuccess) {
      cudaGetLastError();
      p_ = nullptr;
      fail("--device cuda: out of GPU memory: {} needs {} bytes, {} bytes are free on GPU 0; {}", what, bytes,
           free_bytes(), hint);
    }
    bytes_ = bytes;
  }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

constexpr const char* kActHint = "evaluate fewer tokens at once (a smaller --batch or --ctx) or use --device cpu";
constexpr const char* kSlotHint =
    "use --activation-precision bf16 (2 bytes per value instead of 4), calibrate with fewer --samples or a shorter "
    "--seq-len, or use --forward-device cpu";
constexpr const char* kCacheHint =
    "give a smaller --layer-cache-memory (the states it keeps per chunk), or 0 to turn the layer cache off";
constexpr const char* kWeightHint =
    "use --gpu-precision bf16 (2 bytes per weight instead of 4), a GPU with more memory, or --device cpu";

std::string layer_prefix(const io::ModelConfig& c, int64_t l) {
  return (c.arch == io::Arch::Gpt2 ? "transformer.h." : "model.layers.") + std::to_string(l) + ".";
}

class CudaForward final : public Forward {
 private:
  // What an observer learns about an MoE expert's input beyond the dense fields (LinearInput::
  // expert, token_rows, routing_weight, routed; real for the expert's rows). Host pointers.
  struct ExpertFeed {
    int64_t expert = -1;
    const int64_t* token_rows = nullptr;
    const float* weights = nullptr;
    const uint8_t* real = nullptr;
    bool routed = true;
  };
  void describe_expert(LinearInput& in, const ExpertFeed* f) const {
    if (!f) return;
    in.expert = f->expert;
    in.token_rows = f->token_rows;
    in.routing_weight = f->weights;
    in.routed = f->routed;
    in.real = f->real;
  }

 public:
  CudaForward(const io::ModelConfig& cfg, Precision prec, const Source& src, const std::vector<uint8_t>& sliding,
              bool check_nan, int64_t resident_layers, bool bf16_slots)
      : cfg_(cfg),
        prec_(prec),
        src_(src),
        sliding_(sliding),
        check_nan_(check_nan),
        gpt2_(cfg.arch == io::Arch::Gpt2),
        resident_limit_(resident_layers > 0 && resident_layers < cfg.num_hidden_layers ? resident_layers : 0),
        bf16_slots_(bf16_slots) {
    // The calling thread's current device (0 unless a caller chose another: quantize --devices).
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cublas(k::libs().cublasCreate_v2(&blas_), "cublasCreate");
    check_cublas(k::libs().cublasSetStream_v2(blas_, stream_), "cublasSetStream");
    check_cublas(k::libs().cublasSetAtomicsMode(blas_, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
    // Default math: cublasSgemm in true fp32 (no TF32); GemmEx follows its compute type.
    check_cublas(k::libs().cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    if (const char* a = std::getenv("CALQ_CUDA_ATTENTION"); a && *a) {
      CALQ_CHECK(std::string(a) == "tiled" || std::string(a) == "gemm",
                 "CALQ_CUDA_ATTENTION={}: expected tiled or gemm", a);
      tiled_attention_ = std::string(a) == "tiled";
    }
    try {
      upload_weights();
    } catch (...) {  // the destructor does not run for a constructor that throws
      k::libs().cublasDestroy_v2(blas_);
      cudaStreamDestroy(stream_);
      throw;
    }
  }
  ~CudaForward() override {
    if (blas_) k::libs().cublasDestroy_v2(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  void upload(const Activations& h) override {
    CALQ_CHECK(h.hidden == cfg_.hidden_size && static_cast<int64_t>(h.data.size()) == h.rows() * h.hidden &&
                   static_cast<int64_t>(h.lengths.size()) == h.batch,
               "engine (cuda): activations of shape [{}, {}] do not match hidden size {}", h.rows(), h.hidden,
               cfg_.hidden_size);
    B_ = h.batch;
    T_ = h.seq;
    lengths_ = h.lengths;
    const size_t n = static_cast<size_t>(h.rows() * h.hidden);
    resid_.ensure(n * sizeof(float), "the residual stream", kActHint);
    check_cuda(cudaMemcpyAsync(resid_.as<float>(), h.data.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpy(activations to the GPU)");
    d_lengths_.ensure(lengths_.size() * sizeof(int64_t), "sequence lengths", kActHint);
    check_cuda(cudaMemcpyAsync(d_lengths_.as<int64_t>(), lengths_.data(), lengths_.size() * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream_),
               "cudaMemcpy(lengths)");
    check_cuda(cudaStreamSynchronize(stream_), "upload");
  }

  bool embed_tokens(const std::vector<int32_t>& tokens, int64_t batch, int64_t seq,
                    const std::vector<int64_t>& lengths) override {
    const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size, N = batch * seq;
    if (emb_state_ == 0) {  // first use: the table goes to the GPU as stored, if it can
      emb_state_ = -1;
      const std::string name = "model.embed_tokens.weight";
      Source::Raw r = !gpt2_ && src_.raw && src_.contains(name) ? src_.raw(name, false) : Source::Raw{};
      if (r.data && r.checkpoint) {
        const size_t bytes = static_cast<size_t>(V * H) * (r.bf16 ? sizeof(uint16_t) : sizeof(float));
        if (bytes <= free_bytes() / 2) {
          emb_.ensure(bytes, "the embedding table", kWeightHint);
          h2d(emb_.as<void>(), r.data, bytes, "cudaMemcpy(embedding table)");
          emb_bf16_ = r.bf16;
          emb_state_ = 1;
        }
      }
      if (r.checkpoint && src_.release) src_.release(name);
    }
    if (emb_state_ < 0) return false;
    CALQ_CHECK(static_cast<int64_t>(tokens.size()) == N && static_cast<int64_t>(lengths.size()) == batch,
               "engine (cuda): {} tokens and {} lengths for a batch of {} x {}", tokens.size(), lengths.size(), batch,
               seq);
    std::vector<int64_t> rows(tokens.begin(), tokens.end());
    d_tokens_.ensure(rows.size() * sizeof(int64_t), "token ids", kActHint);
    check_cuda(cudaMemcpyAsync(d_tokens_.as<int64_t>(), rows.data(), rows.size() * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream_),
               "cudaMemcpy(token ids)");
    resid_.ensure(static_cast<size_t>(N * H) * sizeof(float), "the residual stream", kActHint);
    if (emb_bf16_)
      k::launch_gather_rows_bf16(emb_.as<uint16_t>(), d_tokens_.as<int64_t>(), N, H, resid_.as<float>(), stream_);
    else
      k::launch_gather_rows(emb_.as<float>(), d_tokens_.as<int64_t>(), N, H, resid_.as<float>(), stream_);
    check_launch("embedding gather");
    B_ = batch;
    T_ = seq;
    lengths_ = lengths;
    d_lengths_.ensure(lengths_.size() * sizeof(int64_t), "sequence lengths", kActHint);
    check_cuda(cudaMemcpyAsync(d_lengths_.as<int64_t>(), lengths_.data(), lengths_.size() * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream_),
               "cudaMemcpy(lengths)");
    check_cuda(cudaStreamSynchronize(stream_), "embedding");  // rows (host) goes out of scope
    return true;
  }

  void download(Activations& h) override {
    h.batch = B_;
    h.seq = T_;
    h.hidden = cfg_.hidden_size;
    h.lengths = lengths_;
    h.data.resize(static_cast<size_t>(B_ * T_ * cfg_.hidden_size));
    check_cuda(cudaMemcpyAsync(h.data.data(), resid_.as<float>(), h.data.size() * sizeof(float),
                               cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpy(activations from the GPU)");
    check_cuda(cudaStreamSynchronize(stream_), "download");
  }

  void stash(int64_t slot) override {
    CALQ_CHECK(B_ > 0, "engine (cuda): stash before any activations were uploaded");
    Slot& sl = slots_[slot];
    const int64_t n = B_ * T_ * cfg_.hidden_size;
    if (bf16_slots_) {  // rounded to nearest even, as round_activations_bf16 on the host
      sl.data.ensure(static_cast<size_t>(n) * sizeof(uint16_t), "calibration activations kept on the GPU", kSlotHint);
      k::launch_to_bf16(resid_.as<float>(), sl.data.as<uint16_t>(), n, stream_);
      check_launch("to_bf16 (activation slot)");
    } else {
      const size_t bytes = static_cast<size_t>(n) * sizeof(float);
      sl.data.ensure(bytes, "calibration activations kept on the GPU", kSlotHint);
      check_cuda(cudaMemcpyAsync(sl.data.as<float>(), resid_.as<float>(), bytes, cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpy(activation slot)");
    }
    sl.batch = B_;
    sl.seq = T_;
    sl.lengths = lengths_;
  }

  void restore(int64_t slot) override {
    auto it = slots_.find(slot);
    CALQ_CHECK(it != slots_.end(), "engine (cuda): activation slot {} was never stashed", slot);
    const Slot& sl = it->second;
    B_ = sl.batch;
    T_ = sl.seq;
    lengths_ = sl.lengths;
    const int64_t n = B_ * T_ * cfg_.hidden_size;
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    resid_.ensure(bytes, "the residual stream", kActHint);
    if (bf16_slots_) {
      k::launch_bf16_to_f32(sl.data.as<uint16_t>(), resid_.as<float>(), n, stream_);
      check_launch("bf16_to_f32 (activation slot)");
    } else {
      check_cuda(cudaMemcpyAsync(resid_.as<float>(), sl.data.as<float>(), bytes, cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpy(activation slot)");
    }
    d_lengths_.ensure(lengths_.size() * sizeof(int64_t), "sequence lengths", kActHint);
    check_cuda(cudaMemcpyAsync(d_lengths_.as<int64_t>(), lengths_.data(), lengths_.size() * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream_),
               "cudaMemcpy(lengths)");
  }

  void free_slots() override { slots_.clear(); }

  void run_layer(int64_t l, Observer* obs, const std::map<std::string, InputTransform>& transforms) override {
    run_layer_from(l, obs, transforms, nullptr);
  }
  void run_layer(int64_t l, Observer* obs, const std::map<std::string, InputTransform>& transforms,
                 StateRun& run) override {
    CALQ_CHECK(run.states, "engine (cuda): a layer-cache run without states");
    run_layer_from(l, obs, transforms, &run);
  }
  // A layer's kept states on the device (engine::LayerCache::device), fp32 like the buffers they
  // copy: the attention output, the residual after attention, the MLP activation.
  struct States {
    DevMem attn, mid, act;
  };
  std::shared_ptr<void> new_states() override { return std::make_shared<States>(); }
  int64_t rows() const override { return B_ * T_; }
  // Copies n floats from `from` into state s (queued on the stream) and records it in `run`.
  void keep_state(StateRun* run, int s, const float* from, int64_t n) {
    if (!run || !run->keep[s]) return;
    States& st = *static_cast<States*>(run->states);
    DevMem& d = s == 0 ? st.attn : s == 1 ? st.mid : st.act;
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    d.ensure(bytes, s == 0 ? "layer cache: attention output" : s == 1 ? "layer cache: residual after attention"
                                                                      : "layer cache: MLP activation",
             kCacheHint);
    check_cuda(cudaMemcpyAsync(d.as<float>(), from, bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpy(layer cache)");
    run->stored[s] = true;
  }
  const float* state(const StateRun* run, int s) const {
    const States& st = *static_cast<const States*>(run->states);
    return (s == 0 ? st.attn : s == 1 ? st.mid : st.act).as<float>();
  }
  // The residual stream h += module(x) (x: N rows of `in` values on the device).
  void add_projection(int64_t l, const std::string& module, const float* x, int64_t in, Observer* obs,
                      const std::map<std::string, InputTransform>& transforms) {
    const int64_t N = B_ * T_;
    linears(l, {module}, x, N, in, obs, transforms, {o_.as<float>()});
    k::launch_add(resid_.as<float>(), o_.as<float>(), N * cfg_.hidden_size, stream_);
    check_launch("residual");
  }
  // The end of the attention block from its output att: h += proj(att), kept as the mid state;
  // or, starting later, h = the kept mid state.
  void finish_attention(int64_t l, const std::string& proj, const float* att, int64_t width, Observer* obs,
                        const std::map<std::string, InputTransform>& transforms, StateRun* run) {
    const int64_t n = B_ * T_ * cfg_.hidden_size;
    if (!run || run->start <= 1) {
      add_projection(l, proj, att, width, obs, transforms);
      keep_state(run, 1, resid_.as<float>(), n);
    } else {
      check_cuda(cudaMemcpyAsync(resid_.as<float>(), state(run, 1), static_cast<size_t>(n) * sizeof(float),
                                 cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpy(layer cache)");
    }
  }

  // Decoder layer l from stage run->start (0 without a cache), keeping the states run asks for.
  void run_layer_from(int64_t l, Observer* obs, const std::map<std::string, InputTransform>& transforms,
                      StateRun* run) {
    CALQ_CHECK(B_ > 0, "engine (cuda): run_layer before any activations were uploaded");
    ensure_layer(l);
    if (gpt2_) return run_gpt2_layer(l, obs, transforms, run);
    const int start = run ? run->start : 0;
    const int64_t N = B_ * T_, H = cfg_.hidden_size, D = cfg_.head_dim, I = cfg_.intermediate_size;
    const int64_t NQ = cfg_.num_attention_heads, NKV = cfg_.num_key_value_heads;
    const std::string p = layer_prefix(cfg_, l), a = p + "self_attn.", m = p + "mlp.";
    const double eps = cfg_.rms_norm_eps;
    const auto sz = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
    const bool sparse = cfg_.is_moe() && cfg_.layer_is_sparse(l);
    const int64_t I_mlp = sparse ? expert_intermediate() : I;
    xn_.ensure(sz(N * H), "normalized activations", kActHint);
    q_.ensure(sz(N * NQ * D), "queries", kActHint);
    k_.ensure(sz(N * NKV * D), "keys", kActHint);
    v_.ensure(sz(N * NKV * D), "values", kActHint);
    att_.ensure(sz(N * NQ * D), "attention output", kActHint);
    o_.ensure(sz(N * H), "projection output", kActHint);
    g_.ensure(sz(N * I_mlp), "MLP gate", kActHint);
    u_.ensure(sz(N * I_mlp), "MLP up", kActHint);
    rope_table(T_);
    real_ = real_mask();
    float* h = resid_.as<float>();

    const float* att = att_.as<float>();
    if (start == 0) {
      rms_norm(h, xn_.as<float>(), N, H, vec(p + "input_layernorm.weight"), eps);
      check_launch("rms_norm");
      linears(l, {a + "q_proj", a + "k_proj", a + "v_proj"}, xn_.as<float>(), N, H, obs, transforms,
              {q_.as<float>(), k_.as<float>(), v_.as<float>()});
      if (cfg_.qk_norm) {
        rms_norm(q_.as<float>(), q_.as<float>(), N * NQ, D, vec(a + "q_norm.weight"), eps);
        rms_norm(k_.as<float>(), k_.as<float>(), N * NKV, D, vec(a + "k_norm.weight"), eps);
        check_launch("qk-norm");
      }
      k::launch_rope(q_.as<float>(), N, NQ * D, NQ, D / 2, T_, rope_cos_.as<float>(), rope_sin_.as<float>(), stream_);
      k::launch_rope(k_.as<float>(), N, NKV * D, NKV, D / 2, T_, rope_cos_.as<float>(), rope_sin_.as<float>(), stream_);
      check_launch("rope");
      const int64_t window = sliding_[static_cast<size_t>(l)] ? cfg_.sliding_window.value_or(0) : 0;
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      attention(q_.as<float>(), NQ * D, k_.as<float>(), NKV * D, v_.as<float>(), NKV * D, att_.as<float>(), NQ * D,
                NQ, NKV, D, window, scale);
      keep_state(run, 0, att_.as<float>(), N * NQ * D);
    } else if (start == 1) {
      att = state(run, 0);
    }
    finish_attention(l, a + "o_proj", att, NQ * D, obs, transforms, run);
    if (start <= 2) {
      rms_norm(h, xn_.as<float>(), N, H, vec(p + "post_attention_layernorm.weight"), eps);
      check_launch("rms_norm");
    }
    if (sparse) {
      moe(l, p, obs, transforms);
    } else {
      const float* act = g_.as<float>();
      if (start <= 2) {
        linears(l, {m + "gate_proj", m + "up_proj"}, xn_.as<float>(), N, H, obs, transforms,
                {g_.as<float>(), u_.as<float>()});
        silu_mul(g_.as<float>(), u_.as<float>(), N * I);
        check_launch("silu_mul");
        keep_state(run, 2, g_.as<float>(), N * I);
      } else {
        act = state(run, 2);
      }
      add_projection(l, m + "down_proj", act, I, obs, transforms);
    }
    if (check_nan_ && nonfinite(h, N * H))
      fail("engine: non-finite activation after decoder layer {} (the first layer producing one)", l);
    check_cuda(cudaStreamSynchronize(stream_), "decoder layer");
  }

  // The intermediate size of an expert (Mixtral: intermediate_size; Qwen3-MoE: moe_intermediate_size).
  int64_t expert_intermediate() const {
    return cfg_.arch == io::Arch::Mixtral ? cfg_.intermediate_size : cfg_.moe_intermediate_size;
  }
  // Module paths of a sparse layer (prefix p): the router and expert e's gate, up and down.
  std::string moe_prefix(const std::string& p) const {
    return p + (cfg_.arch == io::Arch::Mixtral ? "block_sparse_moe." : "mlp.");
  }
  std::vector<std::string> expert_modules(const std::string& p, int64_t e) const {
    const std::string ep = moe_prefix(p) + "experts." + std::to_string(e) + ".";
    if (cfg_.arch == io::Arch::Mixtral) return {ep + "w1", ep + "w3", ep + "w2"};
    return {ep + "gate_proj", ep + "up_proj", ep + "down_proj"};
  }

  // Expert e of layer l on n rows x [n, H] (device) into out [n, H] (device); g_ and u_ hold the
  // intermediate activations. `feed` describes the rows to the observer.
  void expert_mlp(int64_t l, const std::string& p, int64_t e, const float* x, int64_t n, float* out, Observer* obs,
                  const std::map<std::string, InputTransform>& transforms, const ExpertFeed& feed) {
    const int64_t H = cfg_.hidden_size, I = expert_intermediate();
    const auto mods = expert_modules(p, e);
    linears(l, {mods[0], mods[1]}, x, n, H, obs, transforms, {g_.as<float>(), u_.as<float>()}, &feed);
    silu_mul(g_.as<float>(), u_.as<float>(), n * I);
    check_launch("silu_mul (expert)");
    linears(l, {mods[2]}, g_.as<float>(), n, I, obs, transforms, {out}, &feed);
  }

  // A sparse MoE layer on xn_ (the normed hidden state), added into the residual stream: the CPU
  // engine's Impl::moe, with the same observer calls in the same order (router input, on_routing,
  // the statistics-only all_tokens feeds, then each reached expert in index order).
  void moe(int64_t l, const std::string& p, Observer* obs, const std::map<std::string, InputTransform>& transforms) {
    const int64_t N = B_ * T_, H = cfg_.hidden_size, E = cfg_.num_experts, K = cfg_.num_experts_per_tok;
    const std::string router = moe_prefix(p) + "gate";
    const auto sz = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
    router_logits_.ensure(sz(N * E), "router logits", kActHint);
    sel_.ensure(static_cast<size_t>(N * K) * sizeof(int32_t), "routing choices", kActHint);
    sel_w_.ensure(sz(N * K), "routing weights", kActHint);
    linears(l, {router}, xn_.as<float>(), N, H, obs, transforms, {router_logits_.as<float>()});
    // Mixtral always renormalises the top-k probabilities; Qwen3-MoE with norm_topk_prob.
    k::launch_route_topk(router_logits_.as<float>(), N, E, K, cfg_.arch == io::Arch::Mixtral || cfg_.norm_topk_prob,
                         sel_.as<int32_t>(), sel_w_.as<float>(), stream_);
    check_launch("route_topk");
    std::vector<int32_t> sel(static_cast<size_t>(N * K));
    std::vector<float> wts(static_cast<size_t>(N * K));
    check_cuda(cudaMemcpyAsync(sel.data(), sel_.as<int32_t>(), sel.size() * sizeof(int32_t), cudaMemcpyDeviceToHost,
                               stream_),
               "cudaMemcpy(routing)");
    check_cuda(cudaMemcpyAsync(wts.data(), sel_w_.as<float>(), wts.size() * sizeof(float), cudaMemcpyDeviceToHost,
                               stream_),
               "cudaMemcpy(routing)");
    check_cuda(cudaStreamSynchronize(stream_), "routing");
    for (int32_t e : sel)
      if (e < 0 || e >= E) fail("engine: non-finite router logits ({}) in decoder layer {}", router, l);
    if (obs) notify_routing(obs, l, router, N, E, K, sel, wts);
    // Statistics-only feeds (every row through the expert, output discarded) before the routed
    // pass, as on the CPU.
    if (obs)
      for (int64_t e = 0; e < E; ++e) {
        if (!obs->all_tokens(l, e)) continue;
        ExpertFeed f;
        f.expert = e;
        f.real = real_.data();
        f.routed = false;
        expert_mlp(l, p, e, xn_.as<float>(), N, o_.as<float>(), obs, transforms, f);
      }
    // The rows of each expert, rows increasing within an expert, experts in index order.
    std::vector<int64_t> start(static_cast<size_t>(E + 1), 0);
    for (int32_t e : sel) ++start[static_cast<size_t>(e) + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    std::vector<int64_t> rows(static_cast<size_t>(N * K)), next(start.begin(), start.end() - 1);
    std::vector<float> rw(static_cast<size_t>(N * K));
    std::vector<uint8_t> re(static_cast<size_t>(N * K));
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < K; ++j) {
        const size_t e = static_cast<size_t>(sel[static_cast<size_t>(r * K + j)]);
        const size_t i = static_cast<size_t>(next[e]++);
        rows[i] = r;
        rw[i] = wts[static_cast<size_t>(r * K + j)];
        re[i] = real_[static_cast<size_t>(r)];
      }
    moe_rows_.ensure(rows.size() * sizeof(int64_t), "expert rows", kActHint);
    moe_w_.ensure(sz(N * K), "expert weights", kActHint);
    xe_.ensure(sz(N * K * H), "expert inputs", kActHint);
    h2d(moe_rows_.as<int64_t>(), rows.data(), rows.size() * sizeof(int64_t), "cudaMemcpy(expert rows)");
    h2d(moe_w_.as<float>(), rw.data(), rw.size() * sizeof(float), "cudaMemcpy(expert weights)");
    k::launch_gather_rows(xn_.as<float>(), moe_rows_.as<int64_t>(), N * K, H, xe_.as<float>(), stream_);
    check_launch("gather_rows (experts)");
    for (int64_t e = 0; e < E; ++e) {
      const int64_t b = start[e], n = start[e + 1] - b;
      if (n == 0) continue;
      ExpertFeed f;
      f.expert = e;
      f.token_rows = rows.data() + b;
      f.weights = rw.data() + b;
      f.real = re.data() + b;
      expert_mlp(l, p, e, xe_.as<float>() + b * H, n, o_.as<float>(), obs, transforms, f);
      k::launch_scatter_add_rows(resid_.as<float>(), moe_rows_.as<int64_t>() + b, moe_w_.as<float>() + b,
                                 o_.as<float>(), n, H, stream_);
      check_launch("scatter_add_rows");
    }
  }

  // on_routing with host copies (the logits downloaded here; choices and weights already on the host).
  void notify_routing(Observer* obs, int64_t l, const std::string& router, int64_t N, int64_t E, int64_t K,
                      const std::vector<int32_t>& sel, const std::vector<float>& wts) {
    const auto logits = to_host(router_logits_.as<float>(), N * E);
    Routing ro;
    ro.layer = l;
    ro.router = router;
    ro.rows = N;
    ro.num_experts = E;
    ro.top_k = K;
    ro.router_logits = logits.data();
    ro.experts = sel.data();
    ro.weights = wts.data();
    ro.real = real_.data();
    obs->on_routing(ro);
  }

  // GPT-2 (the CPU's run_gpt2_layer): LayerNorm → c_attn (q|k|v in one [N, 3H] product, + bias)
  // → causal MHA (no RoPE; positions were added by embed) → c_proj → residual → LayerNorm → c_fc
  // → gelu_new → mlp.c_proj → residual.
  void run_gpt2_layer(int64_t l, Observer* obs, const std::map<std::string, InputTransform>& transforms,
                      StateRun* run) {
    const int start = run ? run->start : 0;
    const int64_t N = B_ * T_, H = cfg_.hidden_size, NH = cfg_.num_attention_heads, D = H / NH;
    const int64_t I = cfg_.intermediate_size;
    const std::string p = layer_prefix(cfg_, l);
    const double eps = cfg_.rms_norm_eps;
    const auto sz = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
    xn_.ensure(sz(N * H), "normalized activations", kActHint);
    q_.ensure(sz(N * 3 * H), "q|k|v", kActHint);
    att_.ensure(sz(N * H), "attention output", kActHint);
    o_.ensure(sz(N * H), "projection output", kActHint);
    g_.ensure(sz(N * I), "MLP activations", kActHint);
    real_ = real_mask();
    float* h = resid_.as<float>();
    float* qkv = q_.as<float>();
    const float* att = att_.as<float>();
    if (start == 0) {
      k::launch_layer_norm(h, xn_.as<float>(), N, H, vec(p + "ln_1.weight"), vec(p + "ln_1.bias"), eps, stream_);
      check_launch("layer_norm");
      linears(l, {p + "attn.c_attn"}, xn_.as<float>(), N, H, obs, transforms, {qkv});
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      attention(qkv, 3 * H, qkv + H, 3 * H, qkv + 2 * H, 3 * H, att_.as<float>(), H, NH, NH, D, 0, scale);
      keep_state(run, 0, att_.as<float>(), N * H);
    } else if (start == 1) {
      att = state(run, 0);
    }
    finish_attention(l, p + "attn.c_proj", att, H, obs, transforms, run);
    const float* act = g_.as<float>();
    if (start <= 2) {
      k::launch_layer_norm(h, xn_.as<float>(), N, H, vec(p + "ln_2.weight"), vec(p + "ln_2.bias"), eps, stream_);
      check_launch("layer_norm");
      linears(l, {p + "mlp.c_fc"}, xn_.as<float>(), N, H, obs, transforms, {g_.as<float>()});
      k::launch_gelu_tanh(g_.as<float>(), N * I, stream_);
      check_launch("gelu");
      keep_state(run, 2, g_.as<float>(), N * I);
    } else {
      act = state(run, 2);
    }
    add_projection(l, p + "mlp.c_proj", act, I, obs, transforms);
    if (check_nan_ && nonfinite(h, N * H))
      fail("engine: non-finite activation after decoder layer {} (the first layer producing one)", l);
    check_cuda(cudaStreamSynchronize(stream_), "decoder layer");
  }

  // Whether linear weights are held in bf16 (bf16, bf16-fast; fp32 and exact hold fp32).
  bool bf16_weights() const { return prec_ == Precision::BF16 || prec_ == Precision::BF16_FAST; }

  // RMSNorm and SiLU·up: the CPU engine's arithmetic and order in exact mode (exact_kernels.h).
  void rms_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, double eps) {
    if (prec_ == Precision::Exact)
      k::launch_exact_rms_norm(x, y, N, H, w, eps, stream_);
    else
      k::launch_rms_norm(x, y, N, H, w, eps, stream_);
  }
  void silu_mul(float* g, const float* u, int64_t n) {
    if (prec_ == Precision::Exact)
      k::launch_exact_silu_mul(g, u, n, stream_);
    else
      k::launch_silu_mul(g, u, n, stream_);
  }

  // The final norm of rows [0, M) of x into y.
  void final_norm(const float* x, float* y, int64_t M) {
    if (gpt2_)
      k::launch_layer_norm(x, y, M, cfg_.hidden_size, vec("transformer.ln_f.weight"), vec("transformer.ln_f.bias"),
                           cfg_.rms_norm_eps, stream_);
    else
      rms_norm(x, y, M, cfg_.hidden_size, vec("model.norm.weight"), cfg_.rms_norm_eps);
  }

  std::vector<float> head(const std::vector<int64_t>& rows, Observer* obs) override {
    CALQ_CHECK(B_ > 0, "engine (cuda): head before any activations were uploaded");
    const int64_t N = B_ * T_, H = cfg_.hidden_size, V = cfg_.vocab_size;
    const int64_t M = rows.empty() ? N : static_cast<int64_t>(rows.size());
    const auto all_real = real_mask();
    std::vector<uint8_t> real(static_cast<size_t>(M));
    xn_.ensure(static_cast<size_t>(M * H) * sizeof(float), "the head's input", kActHint);
    if (rows.empty()) {
      final_norm(resid_.as<float>(), xn_.as<float>(), N);
      real = all_real;
    } else {
      for (size_t i = 0; i < rows.size(); ++i) {
        CALQ_CHECK(rows[i] >= 0 && rows[i] < N, "engine (cuda): head row {} outside 0..{}", rows[i], N - 1);
        real[i] = all_real[static_cast<size_t>(rows[i])];
      }
      d_rows_.ensure(rows.size() * sizeof(int64_t), "head rows", kActHint);
      o_.ensure(static_cast<size_t>(M * H) * sizeof(float), "the head's rows", kActHint);
      check_cuda(cudaMemcpyAsync(d_rows_.as<int64_t>(), rows.data(), rows.size() * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpy(rows)");
      k::launch_gather_rows(resid_.as<float>(), d_rows_.as<int64_t>(), M, H, o_.as<float>(), stream_);
      final_norm(o_.as<float>(), xn_.as<float>(), M);
      check_cuda(cudaStreamSynchronize(stream_), "head rows");  // rows (host memory) may go away
    }
    check_launch("final norm");
    if (obs) observe(obs, {"lm_head"}, cfg_.num_hidden_layers, xn_.as<float>(), M, H, real.data());
    logits_.ensure(static_cast<size_t>(M * V) * sizeof(float), "the logits", kActHint);
    gemm(head_, xn_.as<float>(), M, logits_.as<float>());
    if (check_nan_ && nonfinite(logits_.as<float>(), M * V)) fail("engine: non-finite logits (final norm / lm head)");
    return to_host(logits_.as<float>(), M * V);
  }

  // Uploads decoder layer l's linear weights (from the checkpoint, or its overrides).
  void upload_layer(int64_t l) {
    for (const auto& it : layer_linears_[static_cast<size_t>(l)]) {
      Linear& L = linears_[it.module];
      L.out = it.out;
      L.in = it.in;
      upload_linear(L, it.module + ".weight", it.module, true);
    }
    resident_.push_back(l);
  }
  bool is_resident(int64_t l) const { return std::find(resident_.begin(), resident_.end(), l) != resident_.end(); }
  // With a resident limit: layer l's weights on the GPU, the least recently run layers' freed
  // first beyond the limit; l becomes the most recently run.
  void ensure_layer(int64_t l) {
    CALQ_CHECK(l >= 0 && l < cfg_.num_hidden_layers, "engine (cuda): no decoder layer {}", l);
    if (!resident_limit_) return;
    if (auto it = std::find(resident_.begin(), resident_.end(), l); it != resident_.end()) {
      resident_.erase(it);
      resident_.push_back(l);
      return;
    }
    check_cuda(cudaStreamSynchronize(stream_), "decoder layer weights");
    while (static_cast<int64_t>(resident_.size()) >= resident_limit_) {
      for (const auto& it : layer_linears_[static_cast<size_t>(resident_.front())]) linears_.erase(it.module);
      resident_.erase(resident_.begin());
    }
    upload_layer(l);
    stage_.reset();
  }
  // Whether module's weights are on the GPU now (modules outside the decoder layers: the head).
  bool module_resident(const std::string& module) const {
    auto it = module_layer_.find(module);
    return it == module_layer_.end() || !resident_limit_ || is_resident(it->second);
  }

  Model::DeviceWeight device_weight(const std::string& module) const override {
    if (gpt2_ || !module_resident(module)) return {};
    auto it = linears_.find(module);
    if (it == linears_.end() || !it->second.w.as<void>()) return {};
    return {it->second.w.as<void>(), it->second.bf16};
  }

  void set_weight_device(const std::string& module, const float* w, int device) override {
    CALQ_CHECK(!gpt2_, "engine (cuda): set_weight_device is not for GPT-2");
    // A layer not on the GPU now takes the override (the Model's host copy) when it goes up.
    if (!module_resident(module)) return;
    auto it = linears_.find(module);
    CALQ_CHECK(it != linears_.end(), "engine (cuda): set_weight_device: linear module {} was not uploaded", module);
    Linear& L = it->second;
    const size_t n = static_cast<size_t>(L.out * L.in);
    int here = 0;
    check_cuda(cudaGetDevice(&here), "cudaGetDevice");
    const float* src = w;
    if (device != here) {  // another GPU's Ŵ: a peer copy into the staging buffer first
      stage_.ensure(n * sizeof(float), "a weight's staging copy", kWeightHint);
      check_cuda(cudaMemcpyPeerAsync(stage_.as<void>(), here, w, device, n * sizeof(float), stream_),
                 "cudaMemcpyPeer(weights)");
      src = stage_.as<float>();
    }
    if (L.bf16)
      k::launch_to_bf16(src, L.w.as<uint16_t>(), static_cast<int64_t>(n), stream_);
    else
      check_cuda(cudaMemcpyAsync(L.w.as<void>(), src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpy(weights)");
    check_launch("set_weight_device");
    check_cuda(cudaStreamSynchronize(stream_), "set_weight_device");
  }

  void reload(const std::string& module) override {
    if (module == "lm_head" && head_name_ == "lm_head.weight") {
      upload_linear(head_, "lm_head.weight", "lm_head", true);
      stage_.reset();
      return;
    }
    auto it = linears_.find(module);
    if (it != linears_.end()) upload_linear(it->second, module + ".weight", module, true);
    stage_.reset();
  }

  int64_t device_bytes() const override {
    size_t n = 0;
    for (const auto& [name, lin] : linears_) n += lin.w.bytes() + lin.bias.bytes();
    for (const auto& [name, v] : vectors_) n += v.bytes();
    n += head_.w.bytes();
    for (const DevMem* m : {&resid_, &xn_, &q_, &k_, &v_, &att_, &o_, &g_, &u_, &xb_, &xt_, &logits_, &router_logits_,
                            &sel_, &sel_w_, &moe_rows_, &moe_w_, &xe_, &attn_s_, &attn_ptr_, &stage_, &emb_, &d_tokens_})
      n += m->bytes();
    return static_cast<int64_t>(n);
  }

 private:
  struct Linear {
    DevMem w, bias;
    int64_t out = 0, in = 0;
    bool bf16 = false, has_bias = false;
    bool one_term = false;  // BF16_FAST: the input rounded to one bf16 term (decoder layers only)
  };


  const float* vec(const std::string& name) const {
    auto it = vectors_.find(name);
    CALQ_CHECK(it != vectors_.end(), "engine (cuda): tensor {} was not uploaded", name);
    return it->second.as<float>();
  }

  std::vector<float> to_host(const float* d, int64_t n) {
    std::vector<float> h(static_cast<size_t>(n));
    check_cuda(cudaMemcpyAsync(h.data(), d, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpy(to host)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaMemcpy(to host)");
    return h;
  }

  // Host → device on the stream, finished on return (the host buffer may go away).
  void h2d(void* dst, const void* src, size_t bytes, const char* what) {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), what);
    check_cuda(cudaStreamSynchronize(stream_), what);
  }

  bool nonfinite(const float* x, int64_t n) {
    nan_count_.ensure(sizeof(unsigned int), "a counter", kActHint);
    check_cuda(cudaMemsetAsync(nan_count_.as<unsigned int>(), 0, sizeof(unsigned int), stream_), "cudaMemset");
    k::launch_count_nonfinite(x, n, nan_count_.as<unsigned int>(), stream_);
    check_launch("count_nonfinite");
    unsigned int c = 0;
    check_cuda(cudaMemcpyAsync(&c, nan_count_.as<unsigned int>(), sizeof c, cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpy(count)");
    check_cuda(cudaStreamSynchronize(stream_), "count_nonfinite");
    return c != 0;
  }

  std::vector<uint8_t> real_mask() const {
    std::vector<uint8_t> m(static_cast<size_t>(B_ * T_));
    for (int64_t r = 0; r < B_ * T_; ++r) m[static_cast<size_t>(r)] = r % T_ < lengths_[static_cast<size_t>(r / T_)];
    return m;
  }

  // cos / sin of position t times each inverse frequency, [T, D/2] each (the CPU's table).
  void rope_table(int64_t T) {
    if (T == rope_T_) return;
    const std::vector<float> inv = rope_inv_freq(cfg_, T);
    const int64_t half = cfg_.head_dim / 2;
    std::vector<float> c(static_cast<size_t>(T * half)), s(static_cast<size_t>(T * half));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(t) * inv[static_cast<size_t>(i)];
        c[static_cast<size_t>(t * half + i)] = std::cos(f);
        s[static_cast<size_t>(t * half + i)] = std::sin(f);
      }
    rope_cos_.ensure(c.size() * sizeof(float), "the RoPE table", kActHint);
    rope_sin_.ensure(s.size() * sizeof(float), "the RoPE table", kActHint);
    h2d(rope_cos_.as<float>(), c.data(), c.size() * sizeof(float), "cudaMemcpy(rope)");
    h2d(rope_sin_.as<float>(), s.data(), s.size() * sizeof(float), "cudaMemcpy(rope)");
    rope_T_ = T;
  }

  // Causal GQA attention of the current batch (the contract of k::launch_attention). Where a
  // block of scores fits the scratch budget (kAttnScratch), through cuBLAS: for each block of
  // kAttnBlock queries, S = K·Qᵀ over the keys the block can see (batched over (sequence, head)
  // pairs), the masked softmax in place, then O = P·V; causality skips the key blocks after each
  // query block; the products are fp32.
  // Otherwise (very long sequences), or with
  // CALQ_CUDA_ATTENTION=tiled, the tiled online-softmax kernel, which holds no score matrix.
  static constexpr int64_t kAttnBlock = 512;
  static constexpr size_t kAttnScratch = size_t{1} << 30;
  void attention(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, float* out,
                 int64_t ldo, int64_t NQ, int64_t NKV, int64_t D, int64_t window, float scale) {
    const int64_t T = T_, pairs = B_ * NQ, groups = NQ / NKV;
    if (prec_ == Precision::Exact) {
      CALQ_CHECK(k::launch_exact_attention(q, ldq, k, ldk, v, ldv, out, ldo, B_, T, NQ, NKV, D,
                                           d_lengths_.as<int64_t>(), window, scale, stream_),
                 "--forward-precision exact: the attention of {} tokens needs {} bytes of shared memory per block, "
                 "more than this GPU gives; use a shorter sequence, another precision or --device cpu",
                 T, (T + D) * static_cast<int64_t>(sizeof(float)));
      check_launch("attention (exact)");
      return;
    }
    const int64_t bq = std::min(T, kAttnBlock);
    const size_t per_pair = static_cast<size_t>(bq * T) * sizeof(float);
    // At most kAttnScratch, and a quarter of what is free (the scores never crowd out the rest).
    const size_t budget = std::min(kAttnScratch, (free_bytes() + attn_s_.bytes()) / 4);
    const int64_t budget_pairs = static_cast<int64_t>(budget / per_pair);
    if (tiled_attention_ || budget_pairs < 1) {
      k::launch_attention(q, ldq, k, ldk, v, ldv, out, ldo, B_, T, NQ, NKV, D, d_lengths_.as<int64_t>(), window, scale,
                          stream_);
      check_launch("attention");
      return;
    }
    const int64_t P = std::min<int64_t>({pairs, budget_pairs, 65535});
    // The calls: per query block, per round of P pairs; pointers K, Q, S and V, O of each pair.
    struct Call {
      int64_t i0, nq, k0, nk, pair0, n;
      size_t ptr;  // offset of its 5 · n pointers
    };
    std::vector<Call> calls;
    std::vector<const float*> ptrs;
    for (int64_t i0 = 0; i0 < T; i0 += bq) {
      const int64_t nq = std::min(bq, T - i0), i1 = i0 + nq;
      const int64_t k0 = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0, nk = i1 - k0;
      for (int64_t p0 = 0; p0 < pairs; p0 += P) {
        const int64_t n = std::min(P, pairs - p0);
        calls.push_back({i0, nq, k0, nk, p0, n, ptrs.size()});
        const size_t at = ptrs.size();
        ptrs.resize(at + 5 * static_cast<size_t>(n));
        for (int64_t j = 0; j < n; ++j) {
          const int64_t b = (p0 + j) / NQ, h = (p0 + j) % NQ, kvh = h / groups;
          const size_t o = at + static_cast<size_t>(j);
          ptrs[o] = k + (b * T + k0) * ldk + kvh * D;
          ptrs[o + n] = q + (b * T + i0) * ldq + h * D;
          ptrs[o + 2 * n] = nullptr;  // S: set below, once the scratch exists
          ptrs[o + 3 * n] = v + (b * T + k0) * ldv + kvh * D;
          ptrs[o + 4 * n] = out + (b * T + i0) * ldo + h * D;
        }
      }
    }
    attn_s_.ensure(static_cast<size_t>(P) * per_pair, "the attention scores of a block of queries", kActHint);
    for (const Call& c : calls)
      for (int64_t j = 0; j < c.n; ++j)
        ptrs[c.ptr + 2 * static_cast<size_t>(c.n) + static_cast<size_t>(j)] = attn_s_.as<float>() + j * c.nq * c.nk;
    attn_ptr_.ensure(ptrs.size() * sizeof(float*), "attention pointer arrays", kActHint);
    h2d(attn_ptr_.as<void>(), ptrs.data(), ptrs.size() * sizeof(float*), "cudaMemcpy(attention pointers)");
    const auto** dp = attn_ptr_.as<const float*>();
    const float one = 1.0f, zero = 0.0f;
    // fp32 products in both modes: TF32 here (measured 2026-12-04) moves bf16-mode logits of
    // 1100-token batches by up to 2.6e-1 (MoE: routing flips) against the 1e-3 bound.
    const cublasComputeType_t attn_compute = CUBLAS_COMPUTE_32F;
    for (const Call& c : calls) {
      const float* const* K = dp + c.ptr;
      const float* const* Q = K + c.n;
      float* const* S = const_cast<float* const*>(K + 2 * c.n);
      const float* const* V = K + 3 * c.n;
      float* const* O = const_cast<float* const*>(K + 4 * c.n);
      const int nk = static_cast<int>(c.nk), nq = static_cast<int>(c.nq), d = static_cast<int>(D);
      const auto vp = [](const float* const* p) { return reinterpret_cast<const void* const*>(p); };
      check_cublas(k::libs().cublasGemmBatchedEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, nk, nq, d, &one, vp(K), CUDA_R_32F,
                                       static_cast<int>(ldk), vp(Q), CUDA_R_32F, static_cast<int>(ldq), &zero,
                                       reinterpret_cast<void* const*>(S), CUDA_R_32F, nk, static_cast<int>(c.n),
                                       attn_compute, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmBatchedEx (attention scores)");
      k::launch_masked_softmax(attn_s_.as<float>(), c.n, c.nq, c.nk, c.i0, c.k0, c.pair0, NQ,
                               d_lengths_.as<int64_t>(), window, scale, stream_);
      check_launch("attention softmax");
      check_cublas(k::libs().cublasGemmBatchedEx(blas_, CUBLAS_OP_N, CUBLAS_OP_N, d, nq, nk, &one, vp(V), CUDA_R_32F,
                                       static_cast<int>(ldv), vp(S), CUDA_R_32F, nk, &zero,
                                       reinterpret_cast<void* const*>(O), CUDA_R_32F, static_cast<int>(ldo),
                                       static_cast<int>(c.n), attn_compute, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmBatchedEx (attention output)");
    }
  }

  // Y[rows, out] = X[rows, in] · Wᵀ (+ bias), X and Y on the device.
  void gemm(const Linear& L, const float* X, int64_t rows, float* Y) {
    if (rows == 0) return;
    const float one = 1.0f, zero = 0.0f;
    const int out = static_cast<int>(L.out), in = static_cast<int>(L.in), n = static_cast<int>(rows);
    if (prec_ == Precision::Exact) {
      // Y = X · Wᵀ as the CPU gemm: A = X [rows, in], B = W [out, in] ("transposed").
      k::launch_exact_gemm(rows, L.out, L.in, 1.0f, 0.0f, X, L.in, 1, L.w.as<void>(), false, 1, L.in, Y, L.out, false,
                           stream_);
      check_launch("gemm (exact)");
    } else if (!L.bf16) {
      check_cublas(k::libs().cublasSgemm_v2(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, L.w.as<float>(), in, X, in, &zero,
                               Y, out),
                   "cublasSgemm");
    } else if (L.one_term) {
      // BF16_FAST: the input rounded to bf16 (round to nearest even), one product.
      const size_t n_in = static_cast<size_t>(rows * L.in);
      xb_.ensure(n_in * sizeof(uint16_t), "bf16 inputs of a product", kActHint);
      k::launch_to_bf16(X, xb_.as<uint16_t>(), static_cast<int64_t>(n_in), stream_);
      check_launch("to_bf16");
      check_cublas(k::libs().cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, L.w.as<void>(), CUDA_R_16BF, in,
                                xb_.as<void>(), CUDA_R_16BF, in, &zero, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (bf16, one term)");
    } else {
      // The fp32 input as two bf16 terms, x ≈ hi + lo (16 significant bits): Y = W·hi + W·lo, both
      // on the tensor cores with fp32 accumulation. One bf16 term alone (8 bits) costs ~1e-2
      // relative in the logits of the test fixtures; two keep them within ~3e-5 of the CPU.
      const size_t n_in = static_cast<size_t>(rows * L.in);
      xb_.ensure(2 * n_in * sizeof(uint16_t), "bf16 inputs of a product", kActHint);
      uint16_t* hi = xb_.as<uint16_t>();
      uint16_t* lo = hi + n_in;
      k::launch_split_bf16(X, hi, lo, static_cast<int64_t>(n_in), stream_);
      check_launch("split_bf16");
      check_cublas(k::libs().cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, L.w.as<void>(), CUDA_R_16BF, in, hi,
                                CUDA_R_16BF, in, &zero, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (bf16, hi)");
      check_cublas(k::libs().cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, L.w.as<void>(), CUDA_R_16BF, in, lo,
                                CUDA_R_16BF, in, &one, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (bf16, lo)");
    }
    if (L.has_bias) {
      k::launch_add_bias(Y, L.bias.as<float>(), rows, L.out, stream_);
      check_launch("add_bias");
    }
  }

  const Linear& linear(const std::string& module) const {
    auto it = linears_.find(module);
    CALQ_CHECK(it != linears_.end(), "engine (cuda): linear module {} was not uploaded", module);
    return it->second;
  }

  // Hands the device input x [rows, cols] of `modules` to the observer: in place on the device
  // when it takes device inputs (ordered on the engine's stream, no copy), else as a host copy.
  void observe(Observer* obs, std::vector<std::string> modules, int64_t layer, const float* x, int64_t rows,
               int64_t cols, const uint8_t* real, const ExpertFeed* expert = nullptr) {
    LinearInput in;
    in.modules = std::move(modules);
    in.layer = layer;
    in.rows = rows;
    in.cols = cols;
    in.real = real;
    describe_expert(in, expert);  // an expert's rows, weights and mask replace the batch's
    std::vector<float> host;
    if (obs->device_input()) {
      in.x_device = x;
      in.stream = stream_;
    } else {
      host = to_host(x, rows * cols);
      in.x = host.data();
    }
    hand_over(obs, in);
  }

  // The observer call: on_linear_input, then, for a dense input the observer is done after, the
  // end of the layer (LayerDone, after the stream's work so far).
  void hand_over(Observer* obs, const LinearInput& in) {
    obs->on_linear_input(in);
    if (in.expert < 0 && obs->done_after(in)) {
      check_cuda(cudaStreamSynchronize(stream_), "decoder layer (stopped by its observer)");
      throw LayerDone{};
    }
  }

  // Observes the shared input of `modules` and multiplies it with each (the CPU engine's
  // Impl::linears: modules with an input transform are observed and multiplied one by one).
  void linears(int64_t layer, const std::vector<std::string>& modules, const float* x, int64_t rows, int64_t cols,
               Observer* obs, const std::map<std::string, InputTransform>& transforms,
               const std::vector<float*>& outs, const ExpertFeed* expert = nullptr) {
    bool any_transform = false;
    for (const auto& m : modules) any_transform = any_transform || transforms.count(m);
    auto notify = [&](std::vector<std::string> mods, const float* xx) {
      if (!obs) return;
      LinearInput in;
      in.modules = std::move(mods);
      in.layer = layer;
      in.x = xx;
      in.rows = rows;
      in.cols = cols;
      in.real = real_.data();
      describe_expert(in, expert);
      hand_over(obs, in);
    };
    if (!any_transform) {
      if (obs) observe(obs, modules, layer, x, rows, cols, real_.data(), expert);
      for (size_t i = 0; i < modules.size(); ++i) gemm(linear(modules[i]), x, rows, outs[i]);
      return;
    }
    const auto host = to_host(x, rows * cols);
    xt_.ensure(host.size() * sizeof(float), "a transformed module input", kActHint);
    for (size_t i = 0; i < modules.size(); ++i) {
      std::vector<float> xt = host;
      if (auto t = transforms.find(modules[i]); t != transforms.end()) t->second(xt.data(), rows, cols);
      notify({modules[i]}, xt.data());
      check_cuda(cudaMemcpyAsync(xt_.as<float>(), xt.data(), xt.size() * sizeof(float), cudaMemcpyHostToDevice,
                                 stream_),
                 "cudaMemcpy(transformed input)");
      gemm(linear(modules[i]), xt_.as<float>(), rows, outs[i]);
      check_cuda(cudaStreamSynchronize(stream_), "transformed input");  // xt (host) and xt_ are reused
    }
  }

  void upload_vector(const std::string& name) {
    const std::vector<float> v = src_.load(name, false);
    DevMem& d = vectors_[name];
    d.ensure(v.size() * sizeof(float), name.c_str(), kWeightHint);
    h2d(d.as<float>(), v.data(), v.size() * sizeof(float), "cudaMemcpy(weights)");
  }

  // `tensor`: the weight's tensor name ([out, in]); `module`: its bias is module + ".bias".
  // The checkpoint's bytes go to the GPU as stored where they can (Source::raw: no host
  // conversion); a width change (bf16 <-> fp32) happens on the GPU from a staging copy, with the
  // same round-to-nearest-even as the host's f32_to_bf16.
  void upload_linear(Linear& L, const std::string& tensor, const std::string& module, bool linear_weight) {
    const size_t n = static_cast<size_t>(L.out * L.in);
    L.bf16 = bf16_weights();
    L.one_term = prec_ == Precision::BF16_FAST && &L != &head_;
    const size_t wbytes = L.bf16 ? sizeof(uint16_t) : sizeof(float);
    Source::Raw raw = src_.raw ? src_.raw(tensor, linear_weight) : Source::Raw{};
    std::vector<float> w;
    if (!raw.data) {
      w = src_.load(tensor, linear_weight);
      CALQ_CHECK(w.size() == n, "engine (cuda): {} has {} values, expected {} x {}", tensor, w.size(), L.out, L.in);
      raw.data = w.data();
      raw.bf16 = false;
    } else {
      CALQ_CHECK(src_.numel(tensor) == static_cast<int64_t>(n), "engine (cuda): {} has {} values, expected {} x {}",
                 tensor, src_.numel(tensor), L.out, L.in);
    }
    L.w.ensure(n * wbytes, tensor.c_str(), kWeightHint);
    if (raw.bf16 == L.bf16) {
      h2d(L.w.as<void>(), raw.data, n * wbytes, "cudaMemcpy(weights)");
    } else {
      const size_t sbytes = n * (raw.bf16 ? sizeof(uint16_t) : sizeof(float));
      stage_.ensure(sbytes, "a weight's staging copy", kWeightHint);
      check_cuda(cudaMemcpyAsync(stage_.as<void>(), raw.data, sbytes, cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpy(weights)");
      if (raw.bf16)
        k::launch_bf16_to_f32(stage_.as<uint16_t>(), L.w.as<float>(), static_cast<int64_t>(n), stream_);
      else
        k::launch_to_bf16(stage_.as<float>(), L.w.as<uint16_t>(), static_cast<int64_t>(n), stream_);
      check_launch("weight conversion");
      check_cuda(cudaStreamSynchronize(stream_), "weight conversion");
    }
    if (raw.checkpoint && src_.release) src_.release(tensor);
    const std::string bias = module + ".bias";
    L.has_bias = src_.contains(bias);
    if (L.has_bias) {
      const std::vector<float> b = src_.load(bias, false);
      CALQ_CHECK(static_cast<int64_t>(b.size()) == L.out, "engine (cuda): {} has {} values, expected {}", bias,
                 b.size(), L.out);
      L.bias.ensure(b.size() * sizeof(float), bias.c_str(), kWeightHint);
      h2d(L.bias.as<float>(), b.data(), b.size() * sizeof(float), "cudaMemcpy(bias)");
    }
  }

  void upload_weights() {
    const int64_t H = cfg_.hidden_size, D = cfg_.head_dim, I = cfg_.intermediate_size, V = cfg_.vocab_size;
    const int64_t NQ = cfg_.num_attention_heads, NKV = cfg_.num_key_value_heads;
    head_name_ = "lm_head.weight";
    if (cfg_.tie_word_embeddings || !src_.contains(head_name_))
      head_name_ = gpt2_ ? "transformer.wte.weight" : "model.embed_tokens.weight";
    // Everything that goes to the GPU, to check the total against the free memory first.
    layer_linears_.assign(static_cast<size_t>(cfg_.num_hidden_layers), {});
    std::vector<std::string> vecs;
    if (gpt2_) {
      vecs = {"transformer.ln_f.weight", "transformer.ln_f.bias"};
      for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
        const std::string p = layer_prefix(cfg_, l);
        auto& lin = layer_linears_[static_cast<size_t>(l)];
        lin.push_back({p + "attn.c_attn", 3 * H, H});
        lin.push_back({p + "attn.c_proj", H, H});
        lin.push_back({p + "mlp.c_fc", I, H});
        lin.push_back({p + "mlp.c_proj", H, I});
        for (const char* t : {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"}) vecs.push_back(p + t);
      }
    } else {
      vecs = {"model.norm.weight"};
    }
    for (int64_t l = 0; l < (gpt2_ ? 0 : cfg_.num_hidden_layers); ++l) {
      const std::string p = layer_prefix(cfg_, l), a = p + "self_attn.", m = p + "mlp.";
      auto& lin = layer_linears_[static_cast<size_t>(l)];
      lin.push_back({a + "q_proj", NQ * D, H});
      lin.push_back({a + "k_proj", NKV * D, H});
      lin.push_back({a + "v_proj", NKV * D, H});
      lin.push_back({a + "o_proj", H, NQ * D});
      if (cfg_.is_moe() && cfg_.layer_is_sparse(l)) {
        const int64_t IE = expert_intermediate();
        lin.push_back({moe_prefix(p) + "gate", cfg_.num_experts, H});
        for (int64_t e = 0; e < cfg_.num_experts; ++e) {
          const auto mods = expert_modules(p, e);
          lin.push_back({mods[0], IE, H});
          lin.push_back({mods[1], IE, H});
          lin.push_back({mods[2], H, IE});
        }
      } else {
        lin.push_back({m + "gate_proj", I, H});
        lin.push_back({m + "up_proj", I, H});
        lin.push_back({m + "down_proj", H, I});
      }
      vecs.push_back(p + "input_layernorm.weight");
      vecs.push_back(p + "post_attention_layernorm.weight");
      if (cfg_.qk_norm) {
        vecs.push_back(a + "q_norm.weight");
        vecs.push_back(a + "k_norm.weight");
      }
    }
    const size_t wbytes = bf16_weights() ? 2 : 4;
    // Bytes of each layer's linear weights (and biases); with a resident limit, the largest
    // resident_limit_ layers count.
    std::vector<size_t> layer_bytes;
    size_t largest = static_cast<size_t>(V * H);  // a staging copy of the largest weight (at most fp32)
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      size_t b = 0;
      for (const auto& it : layer_linears_[static_cast<size_t>(l)]) {
        b += static_cast<size_t>(it.out * it.in) * wbytes;
        if (src_.contains(it.module + ".bias")) b += static_cast<size_t>(it.out) * 4;
        largest = std::max(largest, static_cast<size_t>(it.out * it.in));
        module_layer_[it.module] = l;
      }
      layer_bytes.push_back(b);
    }
    std::sort(layer_bytes.rbegin(), layer_bytes.rend());
    size_t need = static_cast<size_t>(V * H) * wbytes + largest * 4;
    const size_t counted = resident_limit_ ? static_cast<size_t>(resident_limit_) : layer_bytes.size();
    for (size_t i = 0; i < std::min(counted, layer_bytes.size()); ++i) need += layer_bytes[i];
    for (const auto& v : vecs) need += static_cast<size_t>(src_.numel(v)) * 4;
    size_t total = 0;
    const size_t avail = free_bytes(&total);
    if (need > avail)
      fail("--device cuda: out of GPU memory: the weights need {} bytes ({} precision, {}a staging copy of the largest "
           "included), {} bytes are free on GPU 0 (of {}); {}",
           need, wbytes == 2 ? "bf16" : "fp32",
           resident_limit_ ? fmt::format("{} decoder layer(s) at a time, ", resident_limit_) : std::string(), avail,
           total, kWeightHint);
    if (!resident_limit_)
      for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) upload_layer(l);
    for (const auto& v : vecs) upload_vector(v);
    head_.out = V;
    head_.in = H;
    if (head_name_ == "lm_head.weight")
      upload_linear(head_, head_name_, "lm_head", true);
    else
      upload_linear(head_, head_name_, head_name_.substr(0, head_name_.size() - 7), false);
    stage_.reset();
  }

  io::ModelConfig cfg_;
  Precision prec_;
  Source src_;
  std::vector<uint8_t> sliding_;
  bool check_nan_;
  bool gpt2_;
  // Decoder layers whose linear weights are on the GPU: all (resident_limit_ = 0), or at most
  // resident_limit_ of them, uploaded by ensure_layer and freed least recently run first.
  int64_t resident_limit_ = 0;
  bool bf16_slots_ = false;  // Options::bf16_slots: stash rounds to bf16, restore widens
  struct LinearItem {
    std::string module;
    int64_t out, in;
  };
  std::vector<std::vector<LinearItem>> layer_linears_;  // per decoder layer
  std::map<std::string, int64_t> module_layer_;
  std::vector<int64_t> resident_;  // layers on the GPU, least recently run first
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::map<std::string, Linear> linears_;
  std::map<std::string, DevMem> vectors_;
  Linear head_;
  std::string head_name_;
  // The current batch.
  int64_t B_ = 0, T_ = 0;
  std::vector<int64_t> lengths_;
  struct Slot {  // a stashed residual stream (stash / restore)
    DevMem data;
    int64_t batch = 0, seq = 0;
    std::vector<int64_t> lengths;
  };
  std::map<int64_t, Slot> slots_;
  std::vector<uint8_t> real_;
  DevMem resid_, d_lengths_, d_rows_, nan_count_;
  DevMem xn_, q_, k_, v_, att_, o_, g_, u_, xb_, xt_, logits_;
  DevMem attn_s_, attn_ptr_;  // attention through GEMMs: scores of a block of queries, pointer arrays
  bool tiled_attention_ = false;  // CALQ_CUDA_ATTENTION=tiled
  DevMem emb_, d_tokens_;  // embed_tokens: the embedding table as stored, the batch's token ids
  int emb_state_ = 0;        // 0: not tried yet, 1: on the GPU, -1: host embedding
  bool emb_bf16_ = false;
  DevMem stage_;  // a weight's bytes before their width changes on the GPU (upload_linear)
  // MoE layers: router logits [N, E], top-k choices and weights [N, K], the rows grouped by expert
  // (Activations rows and weights, [N·K]) and the gathered expert inputs [N·K, H].
  DevMem router_logits_, sel_, sel_w_, moe_rows_, moe_w_, xe_;
  int64_t rope_T_ = -1;
  DevMem rope_cos_, rope_sin_;
};

}  // namespace

std::unique_ptr<Forward> create(const io::ModelConfig& cfg, Precision precision, const Source& src,
                                const std::vector<uint8_t>& sliding, bool check_nan, int64_t resident_layers,
                                bool bf16_slots) {
  CALQ_CHECK(resident_layers >= 0, "engine (cuda): {} resident layers", resident_layers);
  backend::cuda_require("--device cuda");
  CALQ_CHECK(!cfg.is_moe() || (cfg.num_experts_per_tok >= 1 && cfg.num_experts_per_tok <= cfg.num_experts &&
                               cfg.num_experts <= (int64_t{1} << 30)),
             "--device cuda: {} experts with {} per token", cfg.num_experts, cfg.num_experts_per_tok);
  // RoPE rotates pairs (even head_dim); GPT-2 has none.
  CALQ_CHECK(cfg.head_dim >= 1 && cfg.head_dim <= 256 && (cfg.arch == io::Arch::Gpt2 || cfg.head_dim % 2 == 0),
             "--device cuda: head_dim {} is not supported by the GPU attention kernel (at most 256, even with RoPE); "
             "use --device cpu",
             cfg.head_dim);
  CALQ_CHECK(cfg.num_key_value_heads > 0 && cfg.num_attention_heads % cfg.num_key_value_heads == 0,
             "--device cuda: {} attention heads are not a multiple of {} key/value heads", cfg.num_attention_heads,
             cfg.num_key_value_heads);
  return std::make_unique<CudaForward>(cfg, precision, src, sliding, check_nan, resident_layers, bf16_slots);
}

}  // namespace calq::engine::gpu
