// CPU inference engine: fp32 forward pass of every architecture io::ModelConfig parses, from HF
// checkpoints (bf16/fp16/fp32, sharded or not) and calq outputs (dequantized through
// native::Model::load_f32), with a layer-by-layer API and an observer of every linear module's
// input (the base of calibration / GPTQ). docs/engine.md describes the contract.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "calq/backend/device.h"
#include "calq/engine/fast_exp.h"
#include "calq/export/native.h"
#include "calq/io/config.h"

namespace calq::engine {

// B sequences of T tokens, row-major [B, T]. `lengths` (optional, one per sequence, 1..T) marks
// right padding: positions >= length are padding; they are computed (finite, meaningless) but
// never seen as keys by real tokens.
struct Batch {
  int64_t batch = 0, seq = 0;
  std::vector<int32_t> tokens;
  std::vector<int64_t> lengths;  // empty: every sequence has length seq
};

// The residual stream, [batch*seq, hidden] fp32 row-major; row r is token (r / seq, r % seq).
struct Activations {
  int64_t batch = 0, seq = 0, hidden = 0;
  std::vector<int64_t> lengths;  // always batch entries
  std::vector<float> data;
  int64_t rows() const { return batch * seq; }
  bool real(int64_t row) const { return row % seq < lengths[static_cast<size_t>(row / seq)]; }
  float* row(int64_t r) { return data.data() + r * hidden; }
  const float* row(int64_t r) const { return data.data() + r * hidden; }
};

// The input of one or more linear modules that share it, exactly as multiplied with their
// weights (after any input transform). Pointers are valid during the callback only.
struct LinearInput {
  std::vector<std::string> modules;  // HF module paths, e.g. model.layers.3.self_attn.q_proj
  int64_t layer = 0;
  const float* x = nullptr;          // [rows, cols] row-major, host memory (null when x_device is set)
  int64_t rows = 0, cols = 0;
  // Observer::device_input() with the GPU engine: x is null and x_device is the input on GPU 0
  // ([rows, cols] row-major fp32), valid in the order of `stream` (a cudaStream_t): work the
  // observer puts on that stream, or orders after it with an event, sees x written, and the engine
  // overwrites x only after such work (backend::GpuHessian::add takes both). `real` stays on the host.
  const float* x_device = nullptr;
  void* stream = nullptr;
  const uint8_t* real = nullptr;     // [rows]: 1 for real tokens, 0 for padding
  // MoE expert modules only (expert >= 0): the rows of x are the tokens routed to this expert;
  // token_rows[i] is the Activations row of x's row i and routing_weight[i] its weight.
  int64_t expert = -1;
  const int64_t* token_rows = nullptr;
  const float* routing_weight = nullptr;
  // false: a statistics-only feed (Observer::all_tokens): every token of the layer sent through
  // this expert although the router did not choose it; its output is discarded.
  bool routed = true;
};

// One MoE layer's routing: for every token row (padding included, as transformers routes it).
struct Routing {
  int64_t layer = 0;
  std::string router;               // module path of the router (mlp.gate / block_sparse_moe.gate)
  int64_t rows = 0, num_experts = 0, top_k = 0;
  const float* router_logits = nullptr;  // [rows, num_experts]
  const int32_t* experts = nullptr;      // [rows, top_k], by decreasing weight
  const float* weights = nullptr;        // [rows, top_k]
  const uint8_t* real = nullptr;         // [rows]
};

class Observer {
 public:
  virtual ~Observer() = default;
  virtual void on_linear_input(const LinearInput& in) {}
  virtual void on_routing(const Routing& r) {}
  // MoE calibration (--moe-calibration all-experts, --moe-min-tokens): when true, after routing
  // the engine also runs expert `expert` of `layer` on every token row, for the observer only
  // (LinearInput::routed false, token_rows null, real marks padding); the layer's output still
  // comes from the router's choice alone.
  virtual bool all_tokens(int64_t layer, int64_t expert) const { return false; }
  // true: the observer takes inputs on the device (LinearInput::x_device) where the engine has
  // them there (the GPU engine, for inputs without an input transform); otherwise, and always on
  // the CPU engine, it gets host inputs (LinearInput::x). false (default): host inputs only.
  virtual bool device_input() const { return false; }
  // true: after `in` (a dense input: LinearInput::expert < 0) the observer needs nothing more from
  // this run of the layer, and the run's output will not be used (an observation pass). The engine
  // then stops the layer there, skipping the rest of its work and leaving the activations
  // undefined (Model::run_layer, Model::gpu_run with no output slot). false (default): the layer
  // always runs to its end.
  virtual bool done_after(const LinearInput& in) const { return false; }
};

// Applied in place to a copy of a module's input [rows, cols] before its matmul (the slot for
// online rotations such as Hadamard transforms). The weight must already be expressed in the
// transformed basis (set_weight); modules sharing an input are then fed separately.
using InputTransform = std::function<void(float* x, int64_t rows, int64_t cols)>;

// Arithmetic of the GPU forward pass (Options::device = Cuda): F32 = fp32 weights and
// activations, fp32 GEMMs (no TF32); BF16 = linear weights stored as bf16 (half the memory), each
// product's fp32 input split into two bf16 terms (hi + lo, 16 significant bits) and multiplied on
// the tensor cores with fp32 accumulation (cublasGemmEx); norms, RoPE, attention and the residual
// stream stay fp32. BF16_FAST = BF16 with each decoder-layer product's input rounded to one bf16
// term (8 significant bits, one GEMM instead of two: the arithmetic of an fp16/bf16 forward such
// as the reference GPTQ code's); the head keeps two terms. EXACT = fp32 weights and activations
// with every operation of the CPU engine in the CPU engine's order (products as the CPU gemm's FMA
// chains on the CUDA cores, its RMSNorm and softmax sums, fast_exp), so that the GPU gives this
// file's bits: several times slower than F32; llama-family models, MoE included (not GPT-2)
// (backend/cuda/exact_kernels.h). docs/cuda.md, "Forward pass" and "Exact mode".
enum class Precision { F32, BF16, BF16_FAST, Exact };
// "fp32" | "bf16" | "bf16-fast" | "exact"; anything else throws calq::Error naming `option`.
Precision parse_precision(std::string_view name, std::string_view option = "--gpu-precision");
const char* precision_name(Precision p);  // parse_precision's names

struct Options {
  // Cpu: this file's fp32 engine. Cuda: the decoder layers and the head run on GPU 0 (llama,
  // mistral, qwen2, qwen3, gpt2, and the MoE layers of qwen3_moe and mixtral: router, top-k and
  // experts on the GPU, the routing choice grouped by expert on the host); embed() stays on the
  // host, run_layer() uploads / downloads the activations, forward() and logits_from() keep them on
  // the GPU. Observers (routing and all_tokens feeds included), set_weight and input transforms
  // work as on the CPU.
  backend::Device device = backend::Device::Cpu;
  Precision gpu_precision = Precision::F32;
  bool cache_weights = false;      // keep weights packed (fp32) for the gemm after first use (4 bytes/param)
  bool check_nan = true;           // after each layer and the head: fail naming the first bad layer
  bool allow_long_context = false; // allow seq > max_position_embeddings (rope models only)
  // Cuda: how many decoder layers' linear weights the GPU holds at once (0: all, uploaded at
  // load). With N > 0 a layer's weights go up when a run needs them and the least recently run
  // layer's are freed beyond N (calibration, which runs each layer many times and then never
  // again, uses 1). Norms, the embedding table and the head stay on the GPU.
  int64_t gpu_resident_layers = 0;
  // Cuda: the activation slots of gpu_put / gpu_embed / gpu_run hold bf16 (each value rounded to
  // nearest even, 2 bytes instead of 4; widened back to fp32 when a run starts from the slot).
  // Calibration's --activation-precision bf16, which rounds host-held activations the same way
  // (round_activations_bf16) so that both paths compute the same thing.
  bool bf16_slots = false;
};

// Rounds every value of h to bf16 (nearest even) in place, as a bf16 slot stores it.
void round_activations_bf16(Activations& h);

// Intermediate results of one decoder layer on one chunk of activations, kept between runs of that
// layer on that chunk (CPU engine). Calibration's true-sequential passes run a layer several times,
// each time with more of its modules quantized; a run given a cache starts at the latest kept
// state that none of the changed modules feeds, instead of at the layer's input:
//   attn: the attention output (o_proj's input; GPT-2: attn.c_proj's), valid while q/k/v keep
//         their weights and input transforms;
//   mid:  the residual stream after the attention block (h + o_proj(attn)), valid while o_proj
//         keeps its too;
//   act:  the MLP's activation (down_proj's input; GPT-2: mlp.c_proj's), valid while gate/up
//         (GPT-2: mlp.c_fc) keep theirs too; dense MLPs only (not MoE layers).
// Validity is checked by the engine: every set_weight / set_weight_device / clear_weight /
// set_input_transform of a module gives it a new version, and a state records the versions of the
// modules before it. The results are bit-identical to a run without a cache. A run that starts at
// a state does not show the observer the inputs computed before it: max_start (a stage, 0..3, as
// Model::layer_cache_stage numbers them) bounds where a run may start, so that a pass observing a
// module's input sets it to that module's stage. The caller chooses which states to keep (keep_*:
// their memory, Model::layer_cache_widths). The GPU engine ignores the cache on host-held
// activations (run_layer) and uses it on its device slots (gpu_run), with the states in device
// memory.
struct LayerCache {
  bool keep_attn = false, keep_mid = false, keep_act = false;
  int max_start = 3;  // 0: the input, 1: attn, 2: mid, 3: act
  struct State {
    std::vector<float> data;
    std::vector<uint64_t> key;  // versions of the modules before the state
    bool valid = false;
  };
  // Set by the engine.
  int64_t layer = -1, rows = 0;
  State attn, mid, act;
  int64_t reused[3] = {0, 0, 0};  // runs that started from attn / mid / act (clear() keeps them)
  std::shared_ptr<void> device;   // gpu_run: the states' device memory (State::data stays empty)
  void clear() {
    attn = mid = act = State{};
    layer = -1;
    rows = 0;
  }
};

class Model {
 public:
  static Model load(const std::filesystem::path& dir, const Options& opts = {});
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  const io::ModelConfig& config() const;
  const native::Model& source() const;
  int64_t num_layers() const;

  Activations embed(const Batch& batch) const;
  void run_layer(int64_t layer, Activations& h, Observer* observer = nullptr);
  // run_layer with a cache of the layer's intermediate states on this chunk (LayerCache).
  void run_layer(int64_t layer, Activations& h, Observer* observer, LayerCache* cache);
  // Values per row of layer l's LayerCache states: attn, mid, act (0: the state does not exist, as
  // act on a MoE layer).
  std::array<int64_t, 3> layer_cache_widths(int64_t layer) const;
  // The latest LayerCache stage from which a run still computes this module's input: 0 for q/k/v
  // (GPT-2 attn.c_attn) and for anything outside the decoder layers, 1 for o_proj, 2 for gate/up,
  // the router and MoE experts, 3 for a dense MLP's down_proj (GPT-2 mlp.c_proj).
  int layer_cache_stage(const std::string& module) const;
  // [rows, vocab]. The observer sees the lm head's input as module "lm_head", layer = num_layers()
  // (also when the head is tied to the embedding).
  std::vector<float> head(const Activations& h, Observer* observer = nullptr);
  std::vector<float> forward(const Batch& batch, Observer* observer = nullptr);
  // The logits of positions first..seq-1 of every sequence, [batch * (seq - first), vocab],
  // sequence after sequence (what evaluation scores): embed, every layer, head on those rows.
  std::vector<float> logits_from(const Batch& batch, int64_t first);

  // The GPU engine only (Options::device = Cuda; calq::Error otherwise): activations kept on the
  // device in numbered slots, so that calibration runs a layer over every chunk many times without
  // a host round trip. gpu_put uploads h into a slot; gpu_run runs decoder layer `layer` on slot
  // `in` (the slot keeps its input) and stores the result in slot `out` (-1: discarded, for a pass
  // that only feeds `observer`); gpu_get downloads a slot; gpu_drop_slots frees them all.
  bool on_gpu() const;
  void gpu_put(int64_t slot, const Activations& h);
  // The embedding of `batch` into a slot (embed's checks): gathered on the GPU, without the host
  // copy of gpu_put(slot, embed(batch)), where the embedding table can be read there.
  void gpu_embed(int64_t slot, const Batch& batch);
  void gpu_run(int64_t layer, int64_t in, int64_t out, Observer* observer = nullptr);
  // gpu_run with a cache of the layer's intermediate states on this slot (LayerCache), on the GPU.
  void gpu_run(int64_t layer, int64_t in, int64_t out, Observer* observer, LayerCache* cache);
  void gpu_get(int64_t slot, Activations& h);
  void gpu_drop_slots();

  // Linear modules of the model (HF paths; router gates of MoE layers included, lm_head excluded).
  std::vector<std::string> linear_modules() const;
  // The fp32 weight of a linear module as [out, in] (GPT-2 Conv1D: the transpose of the stored
  // [in, out] tensor), including any set_weight override.
  std::vector<float> weight(const std::string& module);
  // The GPU engine's device copy of a linear module's weight ([out, in], row-major, on the
  // engine's GPU: bf16 bits when bf16, else fp32) when its values are exactly weight(module): a
  // GPU engine, no set_weight override, not GPT-2, and a bf16 device copy only of a bf16
  // checkpoint tensor (fp32 copies widen exactly). data = null otherwise. Valid until the next
  // set_weight / clear_weight of the module. GPTQ on the GPU reads it instead of a host copy.
  struct DeviceWeight {
    const void* data = nullptr;
    bool bf16 = false;
  };
  DeviceWeight device_weight(const std::string& module) const;
  // set_weight with the new weight already on a GPU (fp32 [out, in] on GPU `device`, e.g. GPTQ's
  // Ŵ): the GPU engine takes it there; the host copy that weight() and the CPU paths read is made
  // only when first asked for, by `host` (which must return those same values). GPU engine only.
  void set_weight_device(const std::string& module, const float* w, int device,
                         std::function<std::vector<float>()> host);
  int64_t in_features(const std::string& module) const;
  int64_t out_features(const std::string& module) const;
  // Replaces a linear module's weight ([out, in] fp32) for every later run; clear_weight undoes it.
  void set_weight(const std::string& module, std::vector<float> w_out_in);
  void clear_weight(const std::string& module);
  void set_input_transform(const std::string& module, InputTransform t);

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::vector<int64_t> checked_lengths(const Batch& batch) const;
  void gpu_start(const Batch& batch);
  std::unique_ptr<Impl> impl_;
};

// fast_exp (exp for float, the engine's softmax and SiLU): calq/engine/fast_exp.h.

// Reference pieces, exposed for tests.
// RoPE inverse frequencies as transformers computes them (fp32): default, linear, llama3, dynamic.
std::vector<float> rope_inv_freq(const io::ModelConfig& c, int64_t seq_len);
// Causal attention of one head: q [T, D], k/v [T, D] (strided by ld), out [T, D] (stride ldo);
// keys j with j <= i, j < kv_len and i - j < window (window <= 0: none).
void attention_head(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                    int64_t ldv, float* out, int64_t ldo, int64_t T, int64_t D, int64_t kv_len,
                    int64_t window, float scale);

}  // namespace calq::engine
