#include "calq/engine/engine.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/engine/gemm.h"
#include "calq/engine/gpu.h"
#include "calq/engine/router.h"
#include "calq/model/layout.h"

namespace calq::engine {

namespace {

using io::Arch;

// Elementwise loops smaller than this run on one thread: a parallel region costs more than the
// work, and much more on a machine whose cores are shared (a descheduled thread stalls it).
constexpr int64_t kParallelMin = int64_t{1} << 19;

// RMSNorm as transformers: x * rsqrt(mean(x^2) + eps) in fp32, then * weight.
// The elementwise loops below are compiled for AVX-512, AVX2 and baseline x86-64, chosen at
// load time (GCC function multiversioning): -ffp-contract=off keeps every clone's arithmetic the
// same, so they give the same bits. Sums use fixed partial-sum lanes so that they vectorize.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CALQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CALQ_CLONES
#endif

// sum of x[i]^2 in double, in 8 interleaved partial sums.
CALQ_CLONES double sum_squares(const float* x, int64_t n) {
  double part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<double>(x[i + l]) * x[i + l];
  for (; i < n; ++i) part[0] += static_cast<double>(x[i]) * x[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

CALQ_CLONES void scale_mul(const float* x, float inv, const float* w, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

void rms_norm_rows(const float* x, float* y, int64_t N, int64_t H, const float* w, double eps) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const double ss = sum_squares(x + r * H, H);
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(H) + eps));
    scale_mul(x + r * H, inv, w, y + r * H, H);
  }
}

// Masked softmax of one row of n scores in place: entries [lo, hi] become their probabilities
// (max subtracted, fast_exp, sum in double), every other entry 0.
CALQ_CLONES void softmax_row(float* row, int64_t n, int64_t lo, int64_t hi) {
  float* vis = row + lo;
  const int64_t nv = hi - lo + 1;
  float lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = -INFINITY;
  int64_t j = 0;
  for (; j + 16 <= nv; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] = vis[j + l] > lanes[l] ? vis[j + l] : lanes[l];
  float mx = -INFINITY;
  for (int l = 0; l < 16; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
  for (; j < nv; ++j) mx = vis[j] > mx ? vis[j] : mx;
  for (int64_t i = 0; i < nv; ++i) vis[i] = fast_exp(vis[i] - mx);
  double part[8] = {};
  j = 0;
  for (; j + 8 <= nv; j += 8)
    for (int l = 0; l < 8; ++l) part[l] += vis[j + l];
  for (; j < nv; ++j) part[0] += vis[j];
  const double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < lo; ++i) row[i] = 0.0f;
  for (int64_t i = 0; i < nv; ++i) vis[i] *= inv;
  for (int64_t i = hi + 1; i < n; ++i) row[i] = 0.0f;
}

CALQ_CLONES void add_rows(float* h, const float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += o[i];
}

void layer_norm_rows(const float* x, float* y, int64_t N, int64_t H, const float* w, const float* b,
                     double eps) {
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * H;
    float* yr = y + r * H;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < H; ++i) mean += xr[i];
    mean /= static_cast<double>(H);
    for (int64_t i = 0; i < H; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<double>(H);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < H; ++i)
      yr[i] = static_cast<float>((xr[i] - mean) * inv) * w[i] + b[i];
  }
}

// g = silu(g) * u
CALQ_CLONES void silu_mul(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = (g[i] / (1.0f + fast_exp(-g[i]))) * u[i];
}
float gelu_tanh(float x) {
  const double c = std::sqrt(2.0 / M_PI);
  const double xd = x;
  return static_cast<float>(0.5 * xd * (1.0 + std::tanh(c * (xd + 0.044715 * xd * xd * xd))));
}

std::string layer_prefix(const io::ModelConfig& c, int64_t l) {
  return (c.arch == Arch::Gpt2 ? "transformer.h." : "model.layers.") + std::to_string(l) + ".";
}

bool check_finite(const float* x, size_t n) {
  bool ok = true;
#pragma omp parallel for reduction(&& : ok) schedule(static) if (n >= kParallelMin)
  for (size_t i = 0; i < n; ++i) ok = ok && std::isfinite(x[i]);
  return ok;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
std::vector<float> rope_inv_freq(const io::ModelConfig& c, int64_t seq_len) {
  const int64_t D = c.head_dim;
  const std::string& type = c.rope_scaling.type;
  double base = c.rope_theta;
  if (type == "dynamic") {
    // Dynamic NTK: the base grows once the sequence exceeds the original context.
    const double orig = c.rope_scaling.original_max_position_embeddings > 0
                            ? static_cast<double>(c.rope_scaling.original_max_position_embeddings)
                            : static_cast<double>(c.max_position_embeddings);
    const double len = std::max(static_cast<double>(seq_len), orig);
    const double f = c.rope_scaling.factor;
    base = base * std::pow((f * len / orig) - (f - 1), static_cast<double>(D) / (D - 2));
  } else if (!type.empty() && type != "default" && type != "linear" && type != "llama3") {
    fail("rope scaling '{}' is not supported by the engine (default, linear, llama3, dynamic)", type);
  }
  // transformers: 1 / (base ** (arange(0, D, 2).float() / D)) in fp32.
  const float fbase = static_cast<float>(base);
  std::vector<float> inv(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(D);
    inv[static_cast<size_t>(i)] = 1.0f / std::pow(fbase, e);
  }
  if (type == "linear") {
    for (float& f : inv) f = f / static_cast<float>(c.rope_scaling.factor);
  } else if (type == "llama3") {
    const float factor = static_cast<float>(c.rope_scaling.factor);
    const float lo = static_cast<float>(c.rope_scaling.low_freq_factor);
    const float hi = static_cast<float>(c.rope_scaling.high_freq_factor);
    const float old_len = static_cast<float>(c.rope_scaling.original_max_position_embeddings);
    const float lo_wavelen = old_len / lo, hi_wavelen = old_len / hi;
    for (float& f : inv) {
      const float wavelen = static_cast<float>(2 * M_PI) / f;
      float g = wavelen > lo_wavelen ? f / factor : f;
      const float smooth = (old_len / wavelen - lo) / (hi - lo);
      const float smoothed = (1 - smooth) * g / factor + smooth * g;
      const bool medium = !(wavelen < hi_wavelen) && !(wavelen > lo_wavelen);
      f = medium ? smoothed : g;
    }
  }
  return inv;
}

void attention_head(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                    int64_t ldv, float* out, int64_t ldo, int64_t T, int64_t D, int64_t kv_len,
                    int64_t window, float scale) {
  // Blocks of query rows: scores of the block against the keys it can see (sgemm), masked
  // softmax per row, then probabilities x values (sgemm). At most kBlock x T scores at a time.
  constexpr int64_t kBlock = 64;
  std::vector<float> s;
  for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
    const int64_t i1 = std::min(T, i0 + kBlock), bq = i1 - i0;
    const int64_t kend = std::min(i1, kv_len);
    const int64_t kstart = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0;
    const int64_t nk = kend - kstart;
    if (nk <= 0) {
      for (int64_t i = i0; i < i1; ++i) std::fill(out + i * ldo, out + i * ldo + D, 0.0f);
      continue;
    }
    s.resize(static_cast<size_t>(bq * nk));
    GemmArgs qk;  // s = scale · q kᵀ
    qk.M = bq;
    qk.N = nk;
    qk.K = D;
    qk.alpha = scale;
    qk.A = q + i0 * ldq;
    qk.lda = ldq;
    qk.B = k + kstart * ldk;
    qk.ldb = ldk;
    qk.C = s.data();
    qk.ldc = nk;
    gemm(qk);
    for (int64_t i = i0; i < i1; ++i) {
      float* row = s.data() + (i - i0) * nk;
      const int64_t hi = std::min(i, kv_len - 1);  // inclusive
      const int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      if (hi < lo) {  // a padding row with no visible key (cannot happen for real rows)
        std::fill(row, row + nk, 0.0f);
        continue;
      }
      softmax_row(row, nk, lo - kstart, hi - kstart);
    }
    GemmArgs pv;  // out = p v
    pv.M = bq;
    pv.N = D;
    pv.K = nk;
    pv.A = s.data();
    pv.lda = nk;
    pv.B = v + kstart * ldv;
    pv.b_layout = GemmB::Normal;
    pv.ldb = ldv;
    pv.C = out + i0 * ldo;
    pv.ldc = ldo;
    gemm(pv);
  }
}

// ---------------------------------------------------------------------------------------------
struct Model::Impl {
  native::Model src;
  io::ModelConfig cfg;
  Options opts;
  std::map<std::string, std::vector<float>> overrides;  // module -> [out, in]
  // set_weight_device: module -> its host copy, made when first needed (then moved to overrides).
  std::map<std::string, std::function<std::vector<float>()>> lazy;
  bool has_override(const std::string& module) const { return overrides.count(module) || lazy.count(module); }
  // The module's override (materializing a lazy one), or overrides.end().
  std::map<std::string, std::vector<float>>::iterator find_override(const std::string& module) {
    if (auto l = lazy.find(module); l != lazy.end()) {
      std::vector<float> w = l->second();
      lazy.erase(l);
      overrides[module] = std::move(w);
    }
    return overrides.find(module);
  }
  std::map<std::string, std::vector<float>> cache;      // tensor name -> fp32 (weights [out, in])
  std::map<std::string, InputTransform> transforms;
  std::vector<uint8_t> sliding;  // per layer
  std::unique_ptr<gpu::Forward> gpu;  // Options::device == Cuda

  // Per-layer scratch of loaded tensors (dropped after the layer unless caching).
  std::map<std::string, std::vector<float>> scratch;
  // With cache_weights: linear weights packed for the gemm kernel, by tensor name (instead of
  // fp32 copies in `cache`; Model::weight still goes through `cache`).
  std::map<std::string, PackedB> packed;
  std::vector<std::string> viewed;  // checkpoint tensors multiplied in place this layer
  // LayerCache validity: a module's version changes with its weight or input transform.
  std::map<std::string, uint64_t> versions;
  uint64_t next_version = 1;
  void bump(const std::string& module) { versions[module] = next_version++; }
  // `base` followed by the versions of `modules` (0: never changed).
  std::vector<uint64_t> key(std::vector<uint64_t> base, std::initializer_list<std::string> modules) const {
    for (const auto& m : modules) {
      auto it = versions.find(m);
      base.push_back(it == versions.end() ? 0 : it->second);
    }
    return base;
  }
  static bool usable(const LayerCache::State& s, const std::vector<uint64_t>& key) {
    return s.valid && s.key == key;
  }
  // Keeps `data` as state s (moved in) and returns its storage.
  static float* keep(LayerCache::State& s, std::vector<float>&& data, std::vector<uint64_t> key) {
    s.data = std::move(data);
    s.key = std::move(key);
    s.valid = true;
    return s.data.data();
  }
  // The keys of layer l's states (attn, mid, act): the versions of the modules before each.
  std::array<std::vector<uint64_t>, 3> stage_keys(int64_t l) const {
    const std::string p = layer_prefix(cfg, l);
    std::array<std::vector<uint64_t>, 3> k;
    if (cfg.arch == Arch::Gpt2) {
      k[0] = key({}, {p + "attn.c_attn"});
      k[1] = key(k[0], {p + "attn.c_proj"});
      k[2] = key(k[1], {p + "mlp.c_fc"});
    } else {
      const std::string a = p + "self_attn.", m = p + "mlp.";
      k[0] = key({}, {a + "q_proj", a + "k_proj", a + "v_proj"});
      k[1] = key(k[0], {a + "o_proj"});
      k[2] = key(k[1], {m + "gate_proj", m + "up_proj"});
    }
    return k;
  }
  // Whether layer l has an act state (a dense MLP).
  bool has_act(int64_t l) const { return cfg.arch == Arch::Gpt2 || !(cfg.is_moe() && cfg.layer_is_sparse(l)); }
  // The stage a cached run of layer l on N rows starts at (0: the input, 1: attn, 2: mid, 3: act),
  // after resetting a cache left by another layer or chunk shape. k: the keys of attn, mid, act.
  static int start_stage(LayerCache* c, int64_t l, int64_t N, const std::array<std::vector<uint64_t>, 3>& k,
                         bool has_act) {
    if (!c) return 0;
    if (c->layer != l || c->rows != N) {
      c->clear();
      c->layer = l;
      c->rows = N;
    }
    int st = 0;
    if (c->max_start >= 3 && has_act && usable(c->act, k[2]) && usable(c->mid, k[1]))
      st = 3;
    else if (c->max_start >= 2 && usable(c->mid, k[1]))
      st = 2;
    else if (c->max_start >= 1 && usable(c->attn, k[0]))
      st = 1;
    if (st > 0) ++c->reused[st - 1];
    return st;
  }


  // fp32 tensor by HF name, in HF layout, except that linear weights are [out, in].
  const float* tensor(const std::string& name, bool is_linear_weight) {
    if (is_linear_weight) {
      const std::string module = name.substr(0, name.size() - 7);
      auto o = find_override(module);
      if (o != overrides.end()) return o->second.data();
    }
    if (auto c = cache.find(name); c != cache.end()) return c->second.data();
    if (auto s = scratch.find(name); s != scratch.end()) return s->second.data();
    std::vector<float> v = with_context("loading " + name, [&] { return src.load_f32(name); });
    if (is_linear_weight && cfg.arch == Arch::Gpt2) {
      const Shape& sh = src.entry(name).shape;  // [in, out]
      v = transpose(v, sh[0], sh[1]);
    }
    auto& slot = opts.cache_weights ? cache[name] : scratch[name];
    slot = std::move(v);
    return slot.data();
  }
  const float* weight(const std::string& module) { return tensor(module + ".weight", true); }
  const float* bias(const std::string& module) {
    const std::string n = module + ".bias";
    return src.contains(n) ? tensor(n, false) : nullptr;
  }
  void release_scratch() {
    for (const auto& [name, v] : scratch)
      if (!src.entry(name).format) src.checkpoint().release(name);
    scratch.clear();
    for (const auto& name : viewed) src.checkpoint().release(name);
    viewed.clear();
  }

  // A linear weight [out, in] ready for products, and its bias: a packed copy (cache_weights), the
  // checkpoint's own bf16/fp32 tensor (widened while gemm packs it), or an fp32 [out, in] array
  // (overrides, quantized calq outputs, GPT-2's transposed Conv1D weights).
  struct WeightRef {
    const PackedB* packed = nullptr;
    const void* data = nullptr;
    bool bf16 = false;
    const float* bias = nullptr;
  };
  // `name`: the weight tensor (a module's "<module>.weight", or the tied embedding for the head);
  // `stored_in_out`: stored [in, out] (GPT-2 Conv1D).
  WeightRef weight_ref(const std::string& name, const std::string& module, bool stored_in_out) {
    WeightRef w;
    w.bias = bias(module);
    if (auto o = find_override(module); o != overrides.end()) {
      w.data = o->second.data();
      return w;
    }
    const auto& e = src.entry(name);
    const bool in_place = !e.format && !stored_in_out &&
                          (src.checkpoint().view(name).dtype == DType::BF16 || src.checkpoint().view(name).dtype == DType::F32);
    if (opts.cache_weights) {
      auto it = packed.find(name);
      if (it == packed.end()) {
        const int64_t out = e.shape[stored_in_out ? 1 : 0], in = e.shape[stored_in_out ? 0 : 1];
        PackedB pb;
        if (in_place) {
          const TensorView v = src.checkpoint().view(name);
          pb = PackedB::pack(v.data, v.dtype == DType::BF16, out, in, in);
          src.checkpoint().release(name);
        } else {
          std::vector<float> f = with_context("loading " + name, [&] { return src.load_f32(name); });
          if (stored_in_out) f = transpose(f, e.shape[0], e.shape[1]);
          pb = PackedB::pack(f.data(), false, out, in, in);
        }
        it = packed.emplace(name, std::move(pb)).first;
      }
      w.packed = &it->second;
      return w;
    }
    if (in_place) {
      const TensorView v = src.checkpoint().view(name);
      w.data = v.data;
      w.bf16 = v.dtype == DType::BF16;
      viewed.push_back(name);
      return w;
    }
    w.data = tensor(name, stored_in_out);
    return w;
  }
  WeightRef module_ref(const std::string& module) {
    return weight_ref(module + ".weight", module, cfg.arch == Arch::Gpt2);
  }

  // Y[N, out] = X[N, in] · Wᵀ + bias
  static void apply(const WeightRef& w, const float* X, int64_t N, int64_t in, int64_t out, float* Y) {
    if (N == 0) return;
    if (w.packed)
      gemm_packed(X, N, in, *w.packed, Y, out);
    else
      gemm_nt(X, N, in, w.data, w.bf16, out, Y);
    if (w.bias) {
#pragma omp parallel for schedule(static) if (N * out >= kParallelMin)
      for (int64_t r = 0; r < N; ++r)
        for (int64_t o = 0; o < out; ++o) Y[r * out + o] += w.bias[o];
    }
  }

  // Observes the shared input of `modules` and runs each module's matmul into outs[i].
  void linears(const std::vector<std::string>& modules, const std::vector<int64_t>& outs_n,
               int64_t layer, const float* x, int64_t rows, int64_t cols, const uint8_t* real,
               Observer* obs, const std::vector<float*>& outs, int64_t expert = -1,
               const int64_t* token_rows = nullptr, const float* rw = nullptr, bool routed = true) {
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
      in.real = real;
      in.expert = expert;
      in.token_rows = token_rows;
      in.routing_weight = rw;
      in.routed = routed;
      obs->on_linear_input(in);
      if (expert < 0 && obs->done_after(in)) throw gpu::LayerDone{};
    };
    if (!any_transform) {
      notify(modules, x);
      for (size_t i = 0; i < modules.size(); ++i) apply(module_ref(modules[i]), x, rows, cols, outs_n[i], outs[i]);
      return;
    }
    for (size_t i = 0; i < modules.size(); ++i) {
      std::vector<float> xt(x, x + rows * cols);
      if (auto t = transforms.find(modules[i]); t != transforms.end()) t->second(xt.data(), rows, cols);
      notify({modules[i]}, xt.data());
      apply(module_ref(modules[i]), xt.data(), rows, cols, outs_n[i], outs[i]);
    }
  }

  void attention(const Activations& h, const float* q, int64_t ldq, const float* k, int64_t ldk,
                 const float* v, int64_t ldv, float* out, int64_t NQ, int64_t NKV, int64_t D,
                 int64_t window) {
    const int64_t B = h.batch, T = h.seq, groups = NQ / NKV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int prev = openblas_get_num_threads();
    openblas_set_num_threads(1);  // one sgemm per (sequence, head) and thread
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hd = 0; hd < NQ; ++hd) {
        const int64_t kvh = hd / groups;
        const int64_t r0 = b * T;
        attention_head(q + r0 * ldq + hd * D, ldq, k + r0 * ldk + kvh * D, ldk, v + r0 * ldv + kvh * D,
                       ldv, out + r0 * NQ * D + hd * D, NQ * D, T, D, h.lengths[static_cast<size_t>(b)],
                       window, scale);
      }
    openblas_set_num_threads(prev);
  }

  // cos / sin of position t times each inverse frequency, [T, D/2] each.
  struct RopeTable {
    int64_t T = 0, half = 0;
    std::vector<float> cos, sin;
  };
  RopeTable rope_table(int64_t T) const {
    const std::vector<float> inv = rope_inv_freq(cfg, T);
    RopeTable rt;
    rt.T = T;
    rt.half = cfg.head_dim / 2;
    rt.cos.resize(static_cast<size_t>(T * rt.half));
    rt.sin.resize(static_cast<size_t>(T * rt.half));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < rt.half; ++i) {
        const float f = static_cast<float>(t) * inv[static_cast<size_t>(i)];
        rt.cos[t * rt.half + i] = std::cos(f);
        rt.sin[t * rt.half + i] = std::sin(f);
      }
    return rt;
  }

  // Rotates `heads` heads of D values in each of `rows` rows (row r at position r % T).
  static void apply_rope(float* x, int64_t rows, int64_t ld, int64_t heads, const RopeTable& rt) {
    const int64_t half = rt.half, T = rt.T;
#pragma omp parallel for schedule(static) if (rows * ld >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      const float* cs = rt.cos.data() + (r % T) * half;
      const float* sn = rt.sin.data() + (r % T) * half;
      for (int64_t hd = 0; hd < heads; ++hd) {
        float* xh = x + r * ld + hd * 2 * half;
        for (int64_t i = 0; i < half; ++i) {
          const float c = cs[i], s = sn[i];
          const float a = xh[i], b = xh[i + half];
          xh[i] = a * c - b * s;
          xh[i + half] = b * c + a * s;
        }
      }
    }
  }

  std::vector<uint8_t> real_mask(const Activations& h) const {
    std::vector<uint8_t> m(static_cast<size_t>(h.rows()));
    for (int64_t r = 0; r < h.rows(); ++r) m[static_cast<size_t>(r)] = h.real(r) ? 1 : 0;
    return m;
  }

  // Whether layer l can run sequence-parallel: each thread takes whole sequences through the
  // whole layer (projections, attention, MLP) with one-thread products, so the threads meet once
  // per layer instead of at every product and elementwise pass. Results are identical to the
  // batch path (gemm's sums do not depend on how rows are split). Not with an observer or input
  // transforms (they see whole-batch inputs), nor for MoE layers, nor with fewer sequences than
  // threads (the batch path's products then split rows over all threads instead of idling some).
  bool sequence_parallel(int64_t l, const Activations& h, const Observer* obs) const {
    const int threads = omp_get_max_threads();
    return obs == nullptr && transforms.empty() && !(cfg.is_moe() && cfg.layer_is_sparse(l)) && h.batch >= 2 &&
           !omp_in_parallel() && threads >= 2 && h.batch >= threads;
  }

  struct DenseWeights {
    const float *in_norm, *post_norm, *q_norm = nullptr, *k_norm = nullptr;
    WeightRef q, k, v, o, gate, up, down;
  };

  // Per-thread work buffers of the sequence-parallel path, kept between layers and calls.
  struct SeqBuffers {
    std::vector<float> xn, q, k, v, att, o, g, u;
  };

  void run_llama_layer_split(int64_t l, Activations& h) {
    const std::string p = layer_prefix(cfg, l), a = p + "self_attn.", m = p + "mlp.";
    const int64_t T = h.seq, H = cfg.hidden_size, D = cfg.head_dim, I = cfg.intermediate_size;
    const int64_t NQ = cfg.num_attention_heads, NKV = cfg.num_key_value_heads, groups = NQ / NKV;
    // Every tensor is loaded (or found in the cache) here, on one thread.
    DenseWeights w{};
    w.in_norm = tensor(p + "input_layernorm.weight", false);
    w.post_norm = tensor(p + "post_attention_layernorm.weight", false);
    if (cfg.qk_norm) {
      w.q_norm = tensor(a + "q_norm.weight", false);
      w.k_norm = tensor(a + "k_norm.weight", false);
    }
    w.q = module_ref(a + "q_proj");
    w.k = module_ref(a + "k_proj");
    w.v = module_ref(a + "v_proj");
    w.o = module_ref(a + "o_proj");
    w.gate = module_ref(m + "gate_proj");
    w.up = module_ref(m + "up_proj");
    w.down = module_ref(m + "down_proj");
    const RopeTable rt = rope_table(T);
    const int64_t window = sliding[static_cast<size_t>(l)] ? cfg.sliding_window.value_or(0) : 0;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const double eps = cfg.rms_norm_eps;
    auto sized = [](std::vector<float>& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
      return v.data();
    };

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < h.batch; ++b) {
      static thread_local SeqBuffers buf;
      float* x = h.data.data() + b * T * H;
      float* xn = sized(buf.xn, T * H);
      float* q = sized(buf.q, T * NQ * D);
      float* k = sized(buf.k, T * NKV * D);
      float* v = sized(buf.v, T * NKV * D);
      float* att = sized(buf.att, T * NQ * D);
      float* o = sized(buf.o, T * H);
      float* g = sized(buf.g, T * I);
      float* u = sized(buf.u, T * I);
      rms_norm_rows(x, xn, T, H, w.in_norm, eps);
      apply(w.q, xn, T, H, NQ * D, q);
      apply(w.k, xn, T, H, NKV * D, k);
      apply(w.v, xn, T, H, NKV * D, v);
      if (cfg.qk_norm) {
        rms_norm_rows(q, q, T * NQ, D, w.q_norm, eps);
        rms_norm_rows(k, k, T * NKV, D, w.k_norm, eps);
      }
      apply_rope(q, T, NQ * D, NQ, rt);
      apply_rope(k, T, NKV * D, NKV, rt);
      const int64_t len = h.lengths[static_cast<size_t>(b)];
      for (int64_t hd = 0; hd < NQ; ++hd) {
        const int64_t kvh = hd / groups;
        attention_head(q + hd * D, NQ * D, k + kvh * D, NKV * D, v + kvh * D, NKV * D, att + hd * D, NQ * D, T, D,
                       len, window, scale);
      }
      apply(w.o, att, T, NQ * D, H, o);
      add_rows(x, o, T * H);
      rms_norm_rows(x, xn, T, H, w.post_norm, eps);
      apply(w.gate, xn, T, H, I, g);
      apply(w.up, xn, T, H, I, u);
      silu_mul(g, u, T * I);
      apply(w.down, g, T, I, H, o);
      add_rows(x, o, T * H);
    }
  }

  void run_llama_layer(int64_t l, Activations& h, Observer* obs, LayerCache* c = nullptr) {
    const std::string p = layer_prefix(cfg, l), a = p + "self_attn.", m = p + "mlp.";
    const bool sparse = cfg.is_moe() && cfg.layer_is_sparse(l);
    const int64_t N = h.rows(), H = cfg.hidden_size, D = cfg.head_dim;
    const int64_t NQ = cfg.num_attention_heads, NKV = cfg.num_key_value_heads;
    std::array<std::vector<uint64_t>, 3> k;
    if (c) k = stage_keys(l);
    const int start = start_stage(c, l, N, k, !sparse);
    // With no state to start from, an unobserved run may take the sequence-parallel path (which
    // keeps no states).
    if (start == 0 && sequence_parallel(l, h, obs)) return run_llama_layer_split(l, h);
    const auto real = real_mask(h);
    std::vector<float> xn(static_cast<size_t>(N * H));
    const float* att = nullptr;
    std::vector<float> att_own;
    if (start == 0) {
      rms_norm_rows(h.data.data(), xn.data(), N, H, tensor(p + "input_layernorm.weight", false), cfg.rms_norm_eps);
      std::vector<float> q(static_cast<size_t>(N * NQ * D)), kk(static_cast<size_t>(N * NKV * D)),
          v(static_cast<size_t>(N * NKV * D));
      linears({a + "q_proj", a + "k_proj", a + "v_proj"}, {NQ * D, NKV * D, NKV * D}, l, xn.data(), N, H,
              real.data(), obs, {q.data(), kk.data(), v.data()});
      if (cfg.qk_norm) {
        rms_norm_rows(q.data(), q.data(), N * NQ, D, tensor(a + "q_norm.weight", false), cfg.rms_norm_eps);
        rms_norm_rows(kk.data(), kk.data(), N * NKV, D, tensor(a + "k_norm.weight", false), cfg.rms_norm_eps);
      }
      const RopeTable rt = rope_table(h.seq);
      apply_rope(q.data(), N, NQ * D, NQ, rt);
      apply_rope(kk.data(), N, NKV * D, NKV, rt);
      att_own.resize(static_cast<size_t>(N * NQ * D));
      const int64_t window = sliding[static_cast<size_t>(l)] ? cfg.sliding_window.value_or(0) : 0;
      attention(h, q.data(), NQ * D, kk.data(), NKV * D, v.data(), NKV * D, att_own.data(), NQ, NKV, D, window);
      att = c && c->keep_attn ? keep(c->attn, std::move(att_own), k[0]) : att_own.data();
    } else if (start == 1) {
      att = c->attn.data.data();
    }
    std::vector<float> o(static_cast<size_t>(N * H));
    if (start <= 1) {
      linears({a + "o_proj"}, {H}, l, att, N, NQ * D, real.data(), obs, {o.data()});
      add_into(h.data, o);
      if (c && c->keep_mid) keep(c->mid, std::vector<float>(h.data), k[1]);
    } else {
      h.data = c->mid.data;
    }
    if (sparse) {
      rms_norm_rows(h.data.data(), xn.data(), N, H, tensor(p + "post_attention_layernorm.weight", false),
                    cfg.rms_norm_eps);
      return moe(l, p, xn, h, real, obs);
    }
    const int64_t I = cfg.intermediate_size;
    const float* act = nullptr;
    std::vector<float> g;
    if (start <= 2) {
      rms_norm_rows(h.data.data(), xn.data(), N, H, tensor(p + "post_attention_layernorm.weight", false),
                    cfg.rms_norm_eps);
      g.resize(static_cast<size_t>(N * I));
      std::vector<float> u(static_cast<size_t>(N * I));
      linears({m + "gate_proj", m + "up_proj"}, {I, I}, l, xn.data(), N, H, real.data(), obs, {g.data(), u.data()});
      silu_mul(g.data(), u.data(), N * I);
      act = c && c->keep_act ? keep(c->act, std::move(g), k[2]) : g.data();
    } else {
      act = c->act.data.data();
    }
    linears({m + "down_proj"}, {H}, l, act, N, I, real.data(), obs, {o.data()});
    add_into(h.data, o);
  }

  static void add_into(std::vector<float>& h, const std::vector<float>& o) {
    const int64_t n = static_cast<int64_t>(h.size());
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) h[i] += o[i];
  }

  // out[N, H] = down(silu(gate(x)) * up(x))
  void mlp_swiglu(int64_t l, const std::string& gate, const std::string& up, const std::string& down,
                  int64_t I, const float* x, int64_t N, const uint8_t* real, Observer* obs, float* out,
                  int64_t expert = -1, const int64_t* token_rows = nullptr, const float* rw = nullptr,
                  bool routed = true) {
    const int64_t H = cfg.hidden_size;
    std::vector<float> g(static_cast<size_t>(N * I)), u(static_cast<size_t>(N * I));
    linears({gate, up}, {I, I}, l, x, N, H, real, obs, {g.data(), u.data()}, expert, token_rows, rw, routed);
    silu_mul(g.data(), u.data(), N * I);
    linears({down}, {H}, l, g.data(), N, I, real, obs, {out}, expert, token_rows, rw, routed);
  }

  void moe(int64_t l, const std::string& p, const std::vector<float>& xn, Activations& h,
           const std::vector<uint8_t>& real, Observer* obs) {
    const bool mixtral = cfg.arch == Arch::Mixtral;
    const std::string m = p + (mixtral ? "block_sparse_moe." : "mlp.");
    const int64_t N = h.rows(), H = cfg.hidden_size, E = cfg.num_experts, K = cfg.num_experts_per_tok;
    const int64_t I = mixtral ? cfg.intermediate_size : cfg.moe_intermediate_size;
    std::vector<float> logits(static_cast<size_t>(N * E));
    linears({m + "gate"}, {E}, l, xn.data(), N, H, real.data(), obs, {logits.data()});
    // transformers (Qwen3MoeTopKRouter, MixtralTopKRouter), as calq/engine/router.h computes it
    // (the GPU engine runs the same function): softmax over all experts in fp32,
    // top-k of the probabilities, then (Mixtral always, Qwen3-MoE with norm_topk_prob) divide
    // by their sum -- for Mixtral the same as a softmax over the selected logits.
    const bool renorm = mixtral || cfg.norm_topk_prob;
    std::vector<int32_t> sel(static_cast<size_t>(N * K));
    std::vector<float> wts(static_cast<size_t>(N * K));
#pragma omp parallel for schedule(static) if (N * E * 8 >= kParallelMin)
    for (int64_t r = 0; r < N; ++r)
      route_row(logits.data() + r * E, static_cast<int>(E), static_cast<int>(K), renorm, sel.data() + r * K,
                wts.data() + r * K);
    for (int32_t e : sel)
      if (e < 0 || e >= E) fail("engine: non-finite router logits ({}gate) in decoder layer {}", m, l);
    if (obs) {
      Routing ro;
      ro.layer = l;
      ro.router = m + "gate";
      ro.rows = N;
      ro.num_experts = E;
      ro.top_k = K;
      ro.router_logits = logits.data();
      ro.experts = sel.data();
      ro.weights = wts.data();
      ro.real = real.data();
      obs->on_routing(ro);
    }
    // Statistics-only feeds of every token through the experts the observer asks for, before
    // the routed pass (their outputs are dropped; the routed pass below is unchanged).
    if (obs)
      for (int64_t e = 0; e < E; ++e) {
        if (!obs->all_tokens(l, e)) continue;
        const std::string ep = m + "experts." + std::to_string(e) + ".";
        std::vector<float> ye(static_cast<size_t>(N * H));
        if (mixtral)
          mlp_swiglu(l, ep + "w1", ep + "w3", ep + "w2", I, xn.data(), N, real.data(), obs, ye.data(), e, nullptr,
                     nullptr, false);
        else
          mlp_swiglu(l, ep + "gate_proj", ep + "up_proj", ep + "down_proj", I, xn.data(), N, real.data(), obs,
                     ye.data(), e, nullptr, nullptr, false);
      }
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t> rows;
      std::vector<float> rw;
      for (int64_t r = 0; r < N; ++r)
        for (int64_t j = 0; j < K; ++j)
          if (sel[r * K + j] == e) {
            rows.push_back(r);
            rw.push_back(wts[r * K + j]);
          }
      if (rows.empty()) continue;
      const int64_t n = static_cast<int64_t>(rows.size());
      std::vector<float> xe(static_cast<size_t>(n * H)), ye(static_cast<size_t>(n * H));
      std::vector<uint8_t> re(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        std::copy_n(xn.data() + rows[i] * H, H, xe.data() + i * H);
        re[i] = real[rows[i]];
      }
      const std::string ep = m + "experts." + std::to_string(e) + ".";
      if (mixtral)
        mlp_swiglu(l, ep + "w1", ep + "w3", ep + "w2", I, xe.data(), n, re.data(), obs, ye.data(), e,
                   rows.data(), rw.data());
      else
        mlp_swiglu(l, ep + "gate_proj", ep + "up_proj", ep + "down_proj", I, xe.data(), n, re.data(), obs,
                   ye.data(), e, rows.data(), rw.data());
      for (int64_t i = 0; i < n; ++i) {
        float* hr = h.row(rows[i]);
        for (int64_t c = 0; c < H; ++c) hr[c] += rw[i] * ye[i * H + c];
      }
    }
  }

  void run_gpt2_layer(int64_t l, Activations& h, Observer* obs, LayerCache* c = nullptr) {
    const std::string p = layer_prefix(cfg, l);
    const int64_t N = h.rows(), H = cfg.hidden_size, NH = cfg.num_attention_heads, D = H / NH;
    const int64_t I = cfg.intermediate_size;
    std::array<std::vector<uint64_t>, 3> k;
    if (c) k = stage_keys(l);
    const int start = start_stage(c, l, N, k, true);
    const auto real = real_mask(h);
    const double eps = cfg.rms_norm_eps;
    std::vector<float> xn(static_cast<size_t>(N * H));
    const float* att = nullptr;
    std::vector<float> att_own;
    if (start == 0) {
      layer_norm_rows(h.data.data(), xn.data(), N, H, tensor(p + "ln_1.weight", false), tensor(p + "ln_1.bias", false),
                      eps);
      std::vector<float> qkv(static_cast<size_t>(N * 3 * H));
      linears({p + "attn.c_attn"}, {3 * H}, l, xn.data(), N, H, real.data(), obs, {qkv.data()});
      att_own.resize(static_cast<size_t>(N * H));
      attention(h, qkv.data(), 3 * H, qkv.data() + H, 3 * H, qkv.data() + 2 * H, 3 * H, att_own.data(), NH, NH, D, 0);
      att = c && c->keep_attn ? keep(c->attn, std::move(att_own), k[0]) : att_own.data();
    } else if (start == 1) {
      att = c->attn.data.data();
    }
    std::vector<float> o(static_cast<size_t>(N * H));
    if (start <= 1) {
      linears({p + "attn.c_proj"}, {H}, l, att, N, H, real.data(), obs, {o.data()});
      add_into(h.data, o);
      if (c && c->keep_mid) keep(c->mid, std::vector<float>(h.data), k[1]);
    } else {
      h.data = c->mid.data;
    }
    const float* act = nullptr;
    std::vector<float> f;
    if (start <= 2) {
      layer_norm_rows(h.data.data(), xn.data(), N, H, tensor(p + "ln_2.weight", false), tensor(p + "ln_2.bias", false),
                      eps);
      f.resize(static_cast<size_t>(N * I));
      linears({p + "mlp.c_fc"}, {I}, l, xn.data(), N, H, real.data(), obs, {f.data()});
      const int64_t n = N * I;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
      for (int64_t i = 0; i < n; ++i) f[i] = gelu_tanh(f[i]);
      act = c && c->keep_act ? keep(c->act, std::move(f), k[2]) : f.data();
    } else {
      act = c->act.data.data();
    }
    linears({p + "mlp.c_proj"}, {H}, l, act, N, I, real.data(), obs, {o.data()});
    add_into(h.data, o);
  }
};

// ---------------------------------------------------------------------------------------------
Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::load(const std::filesystem::path& dir, const Options& opts) {
  auto impl = std::make_unique<Impl>(Impl{native::Model::open(dir), {}, opts, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, 1});
  impl->cfg = impl->src.config();
  const io::ModelConfig& c = impl->cfg;
  if (c.arch == Arch::Gpt2) {
    const std::string act = c.raw.value("activation_function", std::string("gelu_new"));
    CALQ_CHECK(act == "gelu_new" || act == "gelu_pytorch_tanh", "{}: gpt2 activation_function '{}' is not supported (gelu_new)",
               dir.string(), act);
  } else {
    CALQ_CHECK(c.hidden_act == "silu", "{}: hidden_act '{}' is not supported (silu)", dir.string(), c.hidden_act);
    CALQ_CHECK(c.shared_expert_intermediate_size == 0,
               "{}: shared experts are not supported by the engine", dir.string());
    rope_inv_freq(c, 1);  // rejects unsupported rope scaling at load time
  }
  // Every tensor the architecture needs, with its shape (a missing bias would otherwise be
  // silently treated as zero).
  for (const auto& t : model::expected_tensors(c)) {
    CALQ_CHECK(impl->src.contains(t.name), "{}: tensor {} is missing", dir.string(), t.name);
    CALQ_CHECK(impl->src.entry(t.name).shape == t.shape, "{}: tensor {} has shape {}, expected {}",
               dir.string(), t.name, shape_str(impl->src.entry(t.name).shape), shape_str(t.shape));
  }
  // Rotated modules (MR-GPTQ): the stored weight is W·R, so the input is rotated too (x·R).
  for (const auto& [module, rot] : impl->src.rotations()) {
    CALQ_CHECK(impl->src.contains(module + ".weight"), "{}: rotation recorded for {}, which is not a linear module",
               dir.string(), module);
    auto r = std::make_shared<const quant::Rotation>(rot);
    impl->transforms[module] = [r, name = module](float* x, int64_t rows, int64_t cols) {
      CALQ_CHECK(cols == r->dim, "engine: {} gets inputs of width {} but its rotation has width {}", name, cols,
                 r->dim);
      r->apply_rows(x, rows);
    };
  }
  impl->sliding.assign(static_cast<size_t>(c.num_hidden_layers), 0);
  if (c.sliding_window && c.arch != Arch::Gpt2) {
    const auto lt = c.raw.find("layer_types");
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      bool s = true;
      if (lt != c.raw.end() && lt->is_array() && static_cast<int64_t>(lt->size()) > l)
        s = (*lt)[static_cast<size_t>(l)] == "sliding_attention";
      impl->sliding[static_cast<size_t>(l)] = s ? 1 : 0;
    }
  }
  if (opts.device == backend::Device::Cuda) {
    // Exact mode mirrors this file's llama-family layers (MoE routing is one shared function,
    // router.h); GPT-2's GELU takes tanh from the math library, whose last bits differ between
    // the host and the GPU.
    CALQ_CHECK(opts.gpu_precision != Precision::Exact || c.arch != Arch::Gpt2,
               "--forward-precision exact supports the llama-family models (llama, mistral, qwen2, qwen3, qwen3_moe, "
               "mixtral), not {} ({}); use fp32 (the CPU's results within 1e-5) or run the forward passes on the CPU",
               c.model_type, dir.string());
    Impl* ip = impl.get();
    gpu::Source s;
    s.contains = [ip](const std::string& n) { return ip->src.contains(n); };
    s.numel = [ip](const std::string& n) { return shape_numel(ip->src.entry(n).shape); };
    s.load = [ip](const std::string& n, bool linear) {
      const int64_t count = shape_numel(ip->src.entry(n).shape);
      const float* p = ip->tensor(n, linear);
      std::vector<float> v(p, p + count);
      ip->release_scratch();
      return v;
    };
    s.raw = [ip](const std::string& n, bool linear) {
      gpu::Source::Raw r;
      if (linear) {
        if (auto o = ip->find_override(n.substr(0, n.size() - 7)); o != ip->overrides.end()) {
          r.data = o->second.data();
          return r;
        }
        if (ip->cfg.arch == Arch::Gpt2) return r;  // Conv1D weights are transposed on loading
      }
      if (ip->src.entry(n).format) return r;
      const TensorView v = ip->src.checkpoint().view(n);
      if (v.dtype != DType::BF16 && v.dtype != DType::F32) return r;
      r.data = v.data;
      r.bf16 = v.dtype == DType::BF16;
      r.checkpoint = true;
      return r;
    };
    s.release = [ip](const std::string& n) { ip->src.checkpoint().release(n); };
    impl->gpu = with_context(dir.string(), [&] {
      return gpu::create(c, opts.gpu_precision, s, impl->sliding, opts.check_nan, opts.gpu_resident_layers,
                         opts.bf16_slots);
    });
  }
  return Model(std::move(impl));
}

const io::ModelConfig& Model::config() const { return impl_->cfg; }
const native::Model& Model::source() const { return impl_->src; }
int64_t Model::num_layers() const { return impl_->cfg.num_hidden_layers; }

namespace {
gpu::Forward& slots_of(const std::unique_ptr<gpu::Forward>& g) {
  CALQ_CHECK(g, "engine: activation slots need the GPU engine (--device cuda)");
  return *g;
}
}  // namespace

// The batch's lengths (every sequence full when none are given), after embed's checks: shapes,
// lengths, context length, every token inside the vocabulary.
std::vector<int64_t> Model::checked_lengths(const Batch& batch) const {
  const io::ModelConfig& c = impl_->cfg;
  CALQ_CHECK(batch.batch > 0 && batch.seq > 0, "engine: empty batch ({} x {})", batch.batch, batch.seq);
  CALQ_CHECK(static_cast<int64_t>(batch.tokens.size()) == batch.batch * batch.seq,
             "engine: batch has {} tokens, expected {} x {}", batch.tokens.size(), batch.batch, batch.seq);
  CALQ_CHECK(batch.lengths.empty() || static_cast<int64_t>(batch.lengths.size()) == batch.batch,
             "engine: {} lengths for {} sequences", batch.lengths.size(), batch.batch);
  if (batch.seq > c.max_position_embeddings) {
    CALQ_CHECK(impl_->opts.allow_long_context && c.arch != Arch::Gpt2,
               "engine: sequence length {} exceeds max_position_embeddings {}{}", batch.seq,
               c.max_position_embeddings,
               c.arch == Arch::Gpt2 ? " (gpt2 has learned positions)" : " (Options::allow_long_context)");
  }
  std::vector<int64_t> lengths =
      batch.lengths.empty() ? std::vector<int64_t>(static_cast<size_t>(batch.batch), batch.seq) : batch.lengths;
  for (int64_t L : lengths)
    CALQ_CHECK(L >= 1 && L <= batch.seq, "engine: sequence length {} outside 1..{}", L, batch.seq);
  for (size_t r = 0; r < batch.tokens.size(); ++r) {
    const int32_t t = batch.tokens[r];
    CALQ_CHECK(t >= 0 && t < c.vocab_size, "engine: token {} at row {} outside the vocabulary (size {})", t, r,
               c.vocab_size);
  }
  return lengths;
}

// The GPU engine's residual stream becomes the batch's embedding: gathered on the GPU where the
// engine can (Forward::embed_tokens), else embedded on the host and uploaded.
void Model::gpu_start(const Batch& batch) {
  const auto lengths = checked_lengths(batch);
  if (!impl_->gpu->embed_tokens(batch.tokens, batch.batch, batch.seq, lengths)) impl_->gpu->upload(embed(batch));
}

void Model::gpu_embed(int64_t slot, const Batch& batch) {
  gpu::Forward& g = slots_of(impl_->gpu);
  gpu_start(batch);
  g.stash(slot);
}

Activations Model::embed(const Batch& batch) const {
  const io::ModelConfig& c = impl_->cfg;
  Activations h;
  h.batch = batch.batch;
  h.seq = batch.seq;
  h.hidden = c.hidden_size;
  h.lengths = checked_lengths(batch);
  h.data.assign(static_cast<size_t>(h.rows() * h.hidden), 0.0f);
  const std::string emb = c.arch == Arch::Gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight";
  const native::Model& src = impl_->src;
  const int64_t H = c.hidden_size;
  std::vector<float> full;
  std::optional<TensorView> view;
  if (src.entry(emb).format)
    full = src.load_f32(emb);
  else
    view = src.checkpoint().view(emb);
#pragma omp parallel for schedule(static) if (h.rows() * H >= kParallelMin)
  for (int64_t r = 0; r < h.rows(); ++r) {
    const int32_t t = batch.tokens[static_cast<size_t>(r)];
    if (view)
      to_f32(view->data + static_cast<size_t>(t) * H * dtype_size(view->dtype), view->dtype, h.row(r),
             static_cast<size_t>(H));
    else
      std::copy_n(full.data() + t * H, H, h.row(r));
  }
  if (c.arch == Arch::Gpt2) {
    auto wpe = src.load_f32("transformer.wpe.weight");
#pragma omp parallel for schedule(static) if (h.rows() * H >= kParallelMin)
    for (int64_t r = 0; r < h.rows(); ++r) {
      const int64_t pos = r % h.seq;
      float* hr = h.row(r);
      for (int64_t i = 0; i < H; ++i) hr[i] += wpe[pos * H + i];
    }
  }
  return h;
}

bool Model::on_gpu() const { return impl_->gpu != nullptr; }


void Model::gpu_put(int64_t slot, const Activations& h) {
  gpu::Forward& g = slots_of(impl_->gpu);
  CALQ_CHECK(h.hidden == impl_->cfg.hidden_size && static_cast<int64_t>(h.data.size()) == h.rows() * h.hidden,
             "engine: activations of shape [{}, {}] do not match hidden size {}", h.rows(), h.hidden,
             impl_->cfg.hidden_size);
  g.upload(h);
  g.stash(slot);
}

void Model::gpu_run(int64_t layer, int64_t in, int64_t out, Observer* observer) {
  gpu_run(layer, in, out, observer, nullptr);
}

void Model::gpu_run(int64_t layer, int64_t in, int64_t out, Observer* observer, LayerCache* cache) {
  gpu::Forward& g = slots_of(impl_->gpu);
  CALQ_CHECK(layer >= 0 && layer < impl_->cfg.num_hidden_layers, "engine: layer {} outside 0..{}", layer,
             impl_->cfg.num_hidden_layers - 1);
  g.restore(in);
  // With a cache: the start and the states to keep as on the CPU (Impl::start_stage); the states
  // themselves live in device memory owned by the cache.
  gpu::Forward::StateRun run;
  std::array<std::vector<uint64_t>, 3> keys;
  if (cache) {
    keys = impl_->stage_keys(layer);
    run.start = Impl::start_stage(cache, layer, g.rows(), keys, impl_->has_act(layer));
    run.keep[0] = cache->keep_attn;
    run.keep[1] = cache->keep_mid;
    run.keep[2] = cache->keep_act && impl_->has_act(layer);
    if (!cache->device) cache->device = g.new_states();
    run.states = cache->device.get();
  }
  // The states whose copies were queued become valid (also after an early end).
  auto mark = [&] {
    if (!cache) return;
    LayerCache::State* st[3] = {&cache->attn, &cache->mid, &cache->act};
    for (int s = 0; s < 3; ++s)
      if (run.stored[s]) {
        st[s]->key = keys[static_cast<size_t>(s)];
        st[s]->valid = true;
      }
  };
  try {
    if (cache)
      g.run_layer(layer, observer, impl_->transforms, run);
    else
      g.run_layer(layer, observer, impl_->transforms);
  } catch (const gpu::LayerDone&) {
    mark();
    CALQ_CHECK(out < 0, "engine: layer {} stopped early by its observer, but its output was asked for", layer);
    return;
  } catch (...) {
    if (cache) cache->clear();  // a failed run may have left a state half written
    throw;
  }
  mark();
  if (out >= 0) g.stash(out);
}

void Model::gpu_get(int64_t slot, Activations& h) {
  gpu::Forward& g = slots_of(impl_->gpu);
  g.restore(slot);
  g.download(h);
}

void Model::gpu_drop_slots() {
  if (impl_->gpu) impl_->gpu->free_slots();
}

void Model::run_layer(int64_t layer, Activations& h, Observer* observer) { run_layer(layer, h, observer, nullptr); }

std::array<int64_t, 3> Model::layer_cache_widths(int64_t layer) const {
  const io::ModelConfig& c = impl_->cfg;
  CALQ_CHECK(layer >= 0 && layer < c.num_hidden_layers, "engine: layer {} outside 0..{}", layer,
             c.num_hidden_layers - 1);
  if (c.arch == Arch::Gpt2) return {c.hidden_size, c.hidden_size, c.intermediate_size};
  const bool sparse = c.is_moe() && c.layer_is_sparse(layer);
  return {c.num_attention_heads * c.head_dim, c.hidden_size, sparse ? 0 : c.intermediate_size};
}

int Model::layer_cache_stage(const std::string& module) const {
  const io::ModelConfig& c = impl_->cfg;
  auto ends = [&](std::string_view suffix) {
    return module.size() >= suffix.size() && module.compare(module.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  int64_t l = -1;
  const std::string lp = c.arch == Arch::Gpt2 ? "transformer.h." : "model.layers.";
  if (module.rfind(lp, 0) == 0) l = std::atoll(module.c_str() + lp.size());
  if (l < 0 || l >= c.num_hidden_layers) return 0;
  const std::string p = layer_prefix(c, l);
  if (c.arch == Arch::Gpt2) {
    if (module == p + "attn.c_proj") return 1;
    if (module == p + "mlp.c_fc") return 2;
    if (module == p + "mlp.c_proj") return 3;
    return 0;
  }
  if (module.rfind(p + "self_attn.", 0) == 0) return ends(".o_proj") ? 1 : 0;
  const bool sparse = c.is_moe() && c.layer_is_sparse(l);
  if (!sparse && module == p + "mlp.down_proj") return 3;
  if (module.rfind(p + "mlp.", 0) == 0 || module.rfind(p + "block_sparse_moe.", 0) == 0) return 2;
  return 0;
}

void Model::run_layer(int64_t layer, Activations& h, Observer* observer, LayerCache* cache) {
  const io::ModelConfig& c = impl_->cfg;
  CALQ_CHECK(layer >= 0 && layer < c.num_hidden_layers, "engine: layer {} outside 0..{}", layer,
             c.num_hidden_layers - 1);
  CALQ_CHECK(h.hidden == c.hidden_size && static_cast<int64_t>(h.data.size()) == h.rows() * h.hidden,
             "engine: activations of shape [{}, {}] do not match hidden size {}", h.rows(), h.hidden,
             c.hidden_size);
  if (impl_->gpu) {
    impl_->gpu->upload(h);
    try {
      impl_->gpu->run_layer(layer, observer, impl_->transforms);
    } catch (const gpu::LayerDone&) {
      return;  // an observation pass: h is left as it came in
    }
    impl_->gpu->download(h);
    return;
  }
  try {
    if (c.arch == Arch::Gpt2)
      impl_->run_gpt2_layer(layer, h, observer, cache);
    else
      impl_->run_llama_layer(layer, h, observer, cache);
  } catch (const gpu::LayerDone&) {
    impl_->release_scratch();  // an observation pass: h is left part-way through the layer
    return;
  } catch (...) {
    impl_->release_scratch();
    throw;
  }
  impl_->release_scratch();
  if (impl_->opts.check_nan && !check_finite(h.data.data(), h.data.size()))
    fail("engine: non-finite activation after decoder layer {} (the first layer producing one)", layer);
}

std::vector<float> Model::head(const Activations& h, Observer* observer) {
  const io::ModelConfig& c = impl_->cfg;
  if (impl_->gpu) {
    CALQ_CHECK(h.hidden == c.hidden_size && static_cast<int64_t>(h.data.size()) == h.rows() * h.hidden,
               "engine: activations of shape [{}, {}] do not match hidden size {}", h.rows(), h.hidden, c.hidden_size);
    impl_->gpu->upload(h);
    return impl_->gpu->head({}, observer);
  }
  const int64_t N = h.rows(), H = c.hidden_size, V = c.vocab_size;
  std::vector<float> xn(static_cast<size_t>(N * H));
  const bool gpt2 = c.arch == Arch::Gpt2;
  if (gpt2)
    layer_norm_rows(h.data.data(), xn.data(), N, H, impl_->tensor("transformer.ln_f.weight", false),
                    impl_->tensor("transformer.ln_f.bias", false), c.rms_norm_eps);
  else
    rms_norm_rows(h.data.data(), xn.data(), N, H, impl_->tensor("model.norm.weight", false), c.rms_norm_eps);
  std::string w = "lm_head.weight";
  if (c.tie_word_embeddings || !impl_->src.contains(w))
    w = gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight";
  std::vector<float> logits(static_cast<size_t>(N * V));
  const auto W = w == "lm_head.weight" ? impl_->module_ref("lm_head")
                                        : impl_->weight_ref(w, w.substr(0, w.size() - 7), false);
  if (observer) {
    const auto real = impl_->real_mask(h);
    LinearInput in;
    in.modules = {"lm_head"};
    in.layer = c.num_hidden_layers;
    in.x = xn.data();
    in.rows = N;
    in.cols = H;
    in.real = real.data();
    observer->on_linear_input(in);
  }
  Impl::apply(W, xn.data(), N, H, V, logits.data());
  impl_->release_scratch();
  if (impl_->opts.check_nan && !check_finite(logits.data(), logits.size()))
    fail("engine: non-finite logits (final norm / lm head)");
  return logits;
}

std::vector<float> Model::forward(const Batch& batch, Observer* observer) {
  if (impl_->gpu) {  // the residual stream stays on the GPU
    gpu_start(batch);
    for (int64_t l = 0; l < num_layers(); ++l) impl_->gpu->run_layer(l, observer, impl_->transforms);
    return impl_->gpu->head({}, observer);
  }
  Activations h = embed(batch);
  for (int64_t l = 0; l < num_layers(); ++l) run_layer(l, h, observer);
  return head(h, observer);
}

std::vector<float> Model::logits_from(const Batch& batch, int64_t first) {
  CALQ_CHECK(first >= 0 && first < batch.seq, "engine: logits from position {} of sequences of {}", first, batch.seq);
  if (impl_->gpu) {
    gpu_start(batch);
    for (int64_t l = 0; l < num_layers(); ++l) impl_->gpu->run_layer(l, nullptr, impl_->transforms);
    std::vector<int64_t> rows;
    rows.reserve(static_cast<size_t>(batch.batch * (batch.seq - first)));
    for (int64_t s = 0; s < batch.batch; ++s)
      for (int64_t t = first; t < batch.seq; ++t) rows.push_back(s * batch.seq + t);
    return impl_->gpu->head(rows, nullptr);
  }
  Activations h = embed(batch);
  for (int64_t l = 0; l < num_layers(); ++l) run_layer(l, h);
  Activations tail;
  tail.batch = 1;
  tail.seq = h.batch * (h.seq - first);
  tail.hidden = h.hidden;
  tail.lengths = {tail.seq};
  tail.data.reserve(static_cast<size_t>(tail.seq * h.hidden));
  for (int64_t s = 0; s < h.batch; ++s)
    tail.data.insert(tail.data.end(), h.data.begin() + (s * h.seq + first) * h.hidden,
                     h.data.begin() + (s + 1) * h.seq * h.hidden);
  return head(tail);
}

Precision parse_precision(std::string_view name, std::string_view option) {
  if (name == "fp32") return Precision::F32;
  if (name == "bf16") return Precision::BF16;
  if (name == "bf16-fast") return Precision::BF16_FAST;
  if (name == "exact") return Precision::Exact;
  fail("{} must be fp32, bf16, bf16-fast or exact, got '{}'", option, name);
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::F32: return "fp32";
    case Precision::BF16: return "bf16";
    case Precision::BF16_FAST: return "bf16-fast";
    case Precision::Exact: return "exact";
  }
  return "?";
}

std::vector<std::string> Model::linear_modules() const {
  const io::ModelConfig& c = impl_->cfg;
  std::vector<std::string> out;
  for (const auto& e : impl_->src.entries()) {
    const std::string& n = e.name;
    if (n.size() < 7 || n.compare(n.size() - 7, 7, ".weight") != 0 || e.shape.size() != 2) continue;
    if (n.find(".layers.") == std::string::npos && n.find("transformer.h.") == std::string::npos) continue;
    out.push_back(n.substr(0, n.size() - 7));
  }
  (void)c;
  return out;
}

int64_t Model::in_features(const std::string& module) const {
  const Shape& s = impl_->src.entry(module + ".weight").shape;
  CALQ_CHECK(s.size() == 2, "engine: {} is not a linear module", module);
  return impl_->cfg.arch == Arch::Gpt2 ? s[0] : s[1];
}
int64_t Model::out_features(const std::string& module) const {
  const Shape& s = impl_->src.entry(module + ".weight").shape;
  CALQ_CHECK(s.size() == 2, "engine: {} is not a linear module", module);
  return impl_->cfg.arch == Arch::Gpt2 ? s[1] : s[0];
}

std::vector<float> Model::weight(const std::string& module) {
  CALQ_CHECK(impl_->src.contains(module + ".weight"), "engine: no linear module {}", module);
  const std::string name = module + ".weight";
  if (!impl_->has_override(module) && !impl_->cache.count(name) && impl_->cfg.arch != Arch::Gpt2) {
    // Straight from the checkpoint into the result (no scratch copy).
    auto w = with_context("loading " + name, [&] { return impl_->src.load_f32(name); });
    if (!impl_->src.entry(name).format) impl_->src.checkpoint().release(name);
    return w;
  }
  const int64_t n = in_features(module) * out_features(module);
  const float* w = impl_->weight(module);
  std::vector<float> out(w, w + n);
  impl_->release_scratch();
  return out;
}

Model::DeviceWeight Model::device_weight(const std::string& module) const {
  if (!impl_->gpu || impl_->cfg.arch == Arch::Gpt2 || impl_->has_override(module)) return {};
  const std::string name = module + ".weight";
  if (!impl_->src.contains(name) || impl_->src.entry(name).format) return {};
  const DType stored = impl_->src.entry(name).dtype;
  DeviceWeight d = impl_->gpu->device_weight(module);
  if (!d.data) return {};
  const bool exact = d.bf16 ? stored == DType::BF16 : stored == DType::F32 || stored == DType::BF16 || stored == DType::F16;
  return exact ? d : DeviceWeight{};
}

void Model::set_weight(const std::string& module, std::vector<float> w) {
  CALQ_CHECK(impl_->src.contains(module + ".weight"), "engine: set_weight: no linear module {}", module);
  const int64_t in = in_features(module), out = out_features(module);
  CALQ_CHECK(static_cast<int64_t>(w.size()) == in * out,
             "engine: set_weight {}: {} values, expected [{}, {}] = {}", module, w.size(), out, in, in * out);
  impl_->lazy.erase(module);
  impl_->overrides[module] = std::move(w);
  impl_->bump(module);
  if (impl_->gpu) impl_->gpu->reload(module);
}

void Model::set_weight_device(const std::string& module, const float* w, int device,
                              std::function<std::vector<float>()> host) {
  CALQ_CHECK(impl_->src.contains(module + ".weight"), "engine: set_weight_device: no linear module {}", module);
  CALQ_CHECK(impl_->gpu && impl_->cfg.arch != Arch::Gpt2 && w && host,
             "engine: set_weight_device {}: needs the GPU engine (not GPT-2), a device weight and its host copy",
             module);
  impl_->gpu->set_weight_device(module, w, device);
  impl_->overrides.erase(module);
  impl_->lazy[module] = std::move(host);
  impl_->bump(module);
}

void Model::clear_weight(const std::string& module) {
  impl_->overrides.erase(module);
  impl_->lazy.erase(module);
  impl_->bump(module);
  if (impl_->gpu && impl_->src.contains(module + ".weight")) impl_->gpu->reload(module);
}

void Model::set_input_transform(const std::string& module, InputTransform t) {
  CALQ_CHECK(impl_->src.contains(module + ".weight"), "engine: set_input_transform: no linear module {}", module);
  if (t)
    impl_->transforms[module] = std::move(t);
  else
    impl_->transforms.erase(module);
  impl_->bump(module);
}

void round_activations_bf16(Activations& h) {
  for (float& v : h.data) v = bf16_to_f32(f32_to_bf16(v));
}

}  // namespace calq::engine
