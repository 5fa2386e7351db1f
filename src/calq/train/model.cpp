#include "calq/train/model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <regex>

#include "calq/core/error.h"
#include "calq/engine/engine.h"
#include "calq/export/native.h"
#include "calq/train/ops.h"

namespace calq::train {

namespace {

using io::Arch;

struct LinearCache {
  std::vector<float> xl;     // the LoRA input (quantized input, dropout applied)
  std::vector<uint8_t> keep; // dropout mask (empty: no dropout)
  std::vector<float> u;      // xl A^T
  std::vector<float> Aq, Bq; // quantized factors (empty: the fp32 ones)
  bool lora = false;
};

// What a decoder layer's backward needs.
struct LayerCache {
  std::vector<float> h0, h1;               // layer input, residual after attention
  std::vector<float> mean1, rstd1, mean2, rstd2;
  std::vector<float> qkv;                  // gpt2: [N, 3H]
  std::vector<float> qraw, kraw, q, k, v;  // llama: before q/k norm, after norm + rope, values
  std::vector<float> qrstd, krstd;
  std::vector<float> P;                    // [B, NQ, T, T]
  std::vector<float> f, g, u;              // gpt2: c_fc output; llama: gate, up
};

struct Block {
  size_t norm1 = 0, norm2 = 0, qnorm = 0, knorm = 0;
  // gpt2: c_attn, c_proj, c_fc, mlp.c_proj; llama: q, k, v, o, gate, up, down
  std::vector<size_t> lin;
};

}  // namespace

struct Model::Impl {
  io::ModelConfig cfg;
  ModelOptions opts;
  bool gpt2 = false;
  std::vector<float> embed;  // [V, H]
  std::vector<float> wpe;    // gpt2 [P, H]
  std::vector<Linear> linears;
  std::vector<Norm> norms;
  std::vector<Block> blocks;
  size_t final_norm = 0, head = 0;
  Hooks* hooks = nullptr;
  bool training = false;
  uint64_t step_seed = 0;
  std::vector<LinearCache> lcache;
  std::vector<LayerCache> cache;
  std::vector<float> cos_t, sin_t;
  int64_t rope_T = -1;

  int64_t H() const { return cfg.hidden_size; }

  // ---- linear with LoRA and hooks ------------------------------------------------------------
  void linear_forward(size_t i, const float* x, int64_t N, float* y, bool keep) {
    Linear& L = linears[i];
    LinearCache& c = lcache[i];
    std::vector<float> xq;
    const float* xin = x;
    if (hooks) {
      xq.assign(x, x + N * L.in);
      hooks->input(i, xq.data(), N, L.in);
      xin = xq.data();
    }
    const float* w = L.w;
    if (hooks)
      if (const float* wq = hooks->weight(i)) w = wq;
    linear_fwd(xin, N, L.in, w, L.bias.empty() ? nullptr : L.bias.data(), L.out, y);
    c.lora = L.lora && (!hooks || hooks->lora_enabled());
    if (!c.lora) {
      c.xl.clear();
      c.u.clear();
      return;
    }
    Lora& lo = *L.lora;
    c.xl.assign(xin, xin + N * L.in);
    c.keep.clear();
    if (training && lo.dropout > 0) {
      std::mt19937_64 rng(step_seed * 1000003ULL + i * 7919ULL + 17);
      std::uniform_real_distribution<float> uni(0.0f, 1.0f);
      c.keep.resize(c.xl.size());
      const float s = 1.0f / (1.0f - lo.dropout);
      for (size_t j = 0; j < c.xl.size(); ++j) {
        c.keep[j] = uni(rng) >= lo.dropout;
        c.xl[j] = c.keep[j] ? c.xl[j] * s : 0.0f;
      }
    }
    c.Aq.resize(lo.A.value.size());
    c.Bq.resize(lo.B.value.size());
    if (!(hooks && hooks->lora_weights(i, lo.A, lo.B, c.Aq.data(), c.Bq.data()))) {
      c.Aq.clear();
      c.Bq.clear();
    }
    const float* A = c.Aq.empty() ? lo.A.value.data() : c.Aq.data();
    const float* B = c.Bq.empty() ? lo.B.value.data() : c.Bq.data();
    c.u.resize(static_cast<size_t>(N * lo.rank));
    lora_fwd(c.xl.data(), N, L.in, A, B, lo.rank, L.out, lo.scale, c.u.data(), y);
    if (!keep) {
      c.xl.clear();
      c.u.clear();
    }
  }

  // dx += d(linear)/dx; LoRA factor gradients accumulated.
  void linear_backward(size_t i, const float* dy, int64_t N, float* dx) {
    Linear& L = linears[i];
    LinearCache& c = lcache[i];
    const float* w = L.w;
    if (hooks)
      if (const float* wq = hooks->weight(i)) w = wq;
    if (dx) linear_bwd_input(dy, N, L.out, w, L.in, dx);  // straight-through the input quantizer
    if (!c.lora) return;
    Lora& lo = *L.lora;
    const float* A = c.Aq.empty() ? lo.A.value.data() : c.Aq.data();
    const float* B = c.Bq.empty() ? lo.B.value.data() : c.Bq.data();
    std::vector<float> dA(lo.A.value.size(), 0.0f), dB(lo.B.value.size(), 0.0f);
    std::vector<float> dxl;
    if (dx) dxl.assign(static_cast<size_t>(N * L.in), 0.0f);
    lora_bwd(dy, c.xl.data(), c.u.data(), N, L.in, A, B, lo.rank, L.out, lo.scale, dA.data(), dB.data(),
             dx ? dxl.data() : nullptr);
    if (dx) {
      const float s = lo.dropout > 0 ? 1.0f / (1.0f - lo.dropout) : 1.0f;
      const int64_t n = N * L.in;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
      for (int64_t j = 0; j < n; ++j) dx[j] += c.keep.empty() ? dxl[j] : (c.keep[j] ? dxl[j] * s : 0.0f);
    }
    if (hooks) hooks->lora_grads(i, dA.data(), static_cast<int64_t>(dA.size()), dB.data(), static_cast<int64_t>(dB.size()));
    for (size_t j = 0; j < dA.size(); ++j) lo.A.grad[j] += dA[j];
    for (size_t j = 0; j < dB.size(); ++j) lo.B.grad[j] += dB[j];
  }

  // ---- norms ---------------------------------------------------------------------------------
  void norm_forward(size_t n, const float* x, int64_t N, int64_t D, float* y, float* mean, float* rstd) {
    Norm& nm = norms[n];
    if (gpt2)
      layer_norm_fwd(x, N, D, nm.w.value.data(), nm.b.value.data(), cfg.rms_norm_eps, y, mean, rstd);
    else
      rms_norm_fwd(x, N, D, nm.w.value.data(), cfg.rms_norm_eps, y, rstd);
  }
  void norm_backward(size_t n, const float* dy, const float* x, const float* mean, const float* rstd, int64_t N,
                     int64_t D, float* dx) {
    Norm& nm = norms[n];
    float* dw = nm.trainable ? nm.w.grad.data() : nullptr;
    if (gpt2)
      layer_norm_bwd(dy, x, mean, rstd, nm.w.value.data(), N, D, dx, dw, nm.trainable ? nm.b.grad.data() : nullptr);
    else
      rms_norm_bwd(dy, x, rstd, nm.w.value.data(), N, D, dx, dw);
  }

  void ensure_rope(int64_t T) {
    if (gpt2 || rope_T == T) return;
    rope_tables(engine::rope_inv_freq(cfg, T), T, cos_t, sin_t);
    rope_T = T;
  }

  // ---- layers --------------------------------------------------------------------------------
  void gpt2_layer(size_t l, std::vector<float>& h, int64_t B, int64_t T, bool keep) {
    const int64_t N = B * T, Hs = H(), NH = cfg.num_attention_heads, D = Hs / NH, I = cfg.intermediate_size;
    Block& bl = blocks[l];
    LayerCache& c = cache[l];
    c.h0 = h;
    c.mean1.resize(N);
    c.rstd1.resize(N);
    std::vector<float> xn(static_cast<size_t>(N * Hs));
    norm_forward(bl.norm1, h.data(), N, Hs, xn.data(), c.mean1.data(), c.rstd1.data());
    c.qkv.resize(static_cast<size_t>(N * 3 * Hs));
    linear_forward(bl.lin[0], xn.data(), N, c.qkv.data(), keep);
    c.P.resize(static_cast<size_t>(B * NH * T * T));
    std::vector<float> att(static_cast<size_t>(N * Hs));
    attention_fwd(c.qkv.data(), 3 * Hs, c.qkv.data() + Hs, c.qkv.data() + 2 * Hs, 3 * Hs, B, T, NH, NH, D,
                  1.0f / std::sqrt(static_cast<float>(D)), att.data(), c.P.data());
    std::vector<float> o(static_cast<size_t>(N * Hs));
    linear_forward(bl.lin[1], att.data(), N, o.data(), keep);
    for (int64_t j = 0; j < N * Hs; ++j) h[j] += o[j];
    c.h1 = h;
    c.mean2.resize(N);
    c.rstd2.resize(N);
    norm_forward(bl.norm2, h.data(), N, Hs, xn.data(), c.mean2.data(), c.rstd2.data());
    c.f.resize(static_cast<size_t>(N * I));
    linear_forward(bl.lin[2], xn.data(), N, c.f.data(), keep);
    std::vector<float> g(static_cast<size_t>(N * I));
    gelu_tanh_fwd(c.f.data(), N * I, g.data());
    linear_forward(bl.lin[3], g.data(), N, o.data(), keep);
    for (int64_t j = 0; j < N * Hs; ++j) h[j] += o[j];
    if (!keep) c = LayerCache{};
  }

  void gpt2_layer_backward(size_t l, std::vector<float>& dh, int64_t B, int64_t T) {
    const int64_t N = B * T, Hs = H(), NH = cfg.num_attention_heads, D = Hs / NH, I = cfg.intermediate_size;
    Block& bl = blocks[l];
    LayerCache& c = cache[l];
    std::vector<float> dg(static_cast<size_t>(N * I), 0.0f);
    linear_backward(bl.lin[3], dh.data(), N, dg.data());
    std::vector<float> df(static_cast<size_t>(N * I));
    gelu_tanh_bwd(dg.data(), c.f.data(), N * I, df.data());
    std::vector<float> dxn(static_cast<size_t>(N * Hs), 0.0f);
    linear_backward(bl.lin[2], df.data(), N, dxn.data());
    norm_backward(bl.norm2, dxn.data(), c.h1.data(), c.mean2.data(), c.rstd2.data(), N, Hs, dh.data());
    std::vector<float> datt(static_cast<size_t>(N * Hs), 0.0f);
    linear_backward(bl.lin[1], dh.data(), N, datt.data());
    std::vector<float> dqkv(static_cast<size_t>(N * 3 * Hs));
    attention_bwd(datt.data(), c.qkv.data(), 3 * Hs, c.qkv.data() + Hs, c.qkv.data() + 2 * Hs, 3 * Hs, c.P.data(), B,
                  T, NH, NH, D, 1.0f / std::sqrt(static_cast<float>(D)), dqkv.data(), dqkv.data() + Hs,
                  dqkv.data() + 2 * Hs);
    std::fill(dxn.begin(), dxn.end(), 0.0f);
    linear_backward(bl.lin[0], dqkv.data(), N, dxn.data());
    norm_backward(bl.norm1, dxn.data(), c.h0.data(), c.mean1.data(), c.rstd1.data(), N, Hs, dh.data());
    c = LayerCache{};
  }

  void llama_layer(size_t l, std::vector<float>& h, int64_t B, int64_t T, bool keep) {
    const int64_t N = B * T, Hs = H(), D = cfg.head_dim, NQ = cfg.num_attention_heads,
                  NKV = cfg.num_key_value_heads, I = cfg.intermediate_size;
    Block& bl = blocks[l];
    LayerCache& c = cache[l];
    c.h0 = h;
    c.rstd1.resize(N);
    std::vector<float> xn(static_cast<size_t>(N * Hs));
    norm_forward(bl.norm1, h.data(), N, Hs, xn.data(), nullptr, c.rstd1.data());
    c.qraw.resize(static_cast<size_t>(N * NQ * D));
    c.kraw.resize(static_cast<size_t>(N * NKV * D));
    c.v.resize(static_cast<size_t>(N * NKV * D));
    linear_forward(bl.lin[0], xn.data(), N, c.qraw.data(), keep);
    linear_forward(bl.lin[1], xn.data(), N, c.kraw.data(), keep);
    linear_forward(bl.lin[2], xn.data(), N, c.v.data(), keep);
    c.q = c.qraw;
    c.k = c.kraw;
    if (cfg.qk_norm) {
      c.qrstd.resize(static_cast<size_t>(N * NQ));
      c.krstd.resize(static_cast<size_t>(N * NKV));
      norm_forward(bl.qnorm, c.qraw.data(), N * NQ, D, c.q.data(), nullptr, c.qrstd.data());
      norm_forward(bl.knorm, c.kraw.data(), N * NKV, D, c.k.data(), nullptr, c.krstd.data());
    }
    rope_apply(c.q.data(), N, T, NQ * D, NQ, D, cos_t.data(), sin_t.data(), false);
    rope_apply(c.k.data(), N, T, NKV * D, NKV, D, cos_t.data(), sin_t.data(), false);
    c.P.resize(static_cast<size_t>(B * NQ * T * T));
    std::vector<float> att(static_cast<size_t>(N * NQ * D));
    attention_fwd(c.q.data(), NQ * D, c.k.data(), c.v.data(), NKV * D, B, T, NQ, NKV, D,
                  1.0f / std::sqrt(static_cast<float>(D)), att.data(), c.P.data());
    std::vector<float> o(static_cast<size_t>(N * Hs));
    linear_forward(bl.lin[3], att.data(), N, o.data(), keep);
    for (int64_t j = 0; j < N * Hs; ++j) h[j] += o[j];
    c.h1 = h;
    c.rstd2.resize(N);
    norm_forward(bl.norm2, h.data(), N, Hs, xn.data(), nullptr, c.rstd2.data());
    c.g.resize(static_cast<size_t>(N * I));
    c.u.resize(static_cast<size_t>(N * I));
    linear_forward(bl.lin[4], xn.data(), N, c.g.data(), keep);
    linear_forward(bl.lin[5], xn.data(), N, c.u.data(), keep);
    std::vector<float> a(static_cast<size_t>(N * I));
    swiglu_fwd(c.g.data(), c.u.data(), N * I, a.data());
    linear_forward(bl.lin[6], a.data(), N, o.data(), keep);
    for (int64_t j = 0; j < N * Hs; ++j) h[j] += o[j];
    if (!keep) c = LayerCache{};
  }

  void llama_layer_backward(size_t l, std::vector<float>& dh, int64_t B, int64_t T) {
    const int64_t N = B * T, Hs = H(), D = cfg.head_dim, NQ = cfg.num_attention_heads,
                  NKV = cfg.num_key_value_heads, I = cfg.intermediate_size;
    Block& bl = blocks[l];
    LayerCache& c = cache[l];
    std::vector<float> da(static_cast<size_t>(N * I), 0.0f);
    linear_backward(bl.lin[6], dh.data(), N, da.data());
    std::vector<float> dg(static_cast<size_t>(N * I)), du(static_cast<size_t>(N * I));
    swiglu_bwd(da.data(), c.g.data(), c.u.data(), N * I, dg.data(), du.data());
    std::vector<float> dxn(static_cast<size_t>(N * Hs), 0.0f);
    linear_backward(bl.lin[4], dg.data(), N, dxn.data());
    linear_backward(bl.lin[5], du.data(), N, dxn.data());
    norm_backward(bl.norm2, dxn.data(), c.h1.data(), nullptr, c.rstd2.data(), N, Hs, dh.data());
    std::vector<float> datt(static_cast<size_t>(N * NQ * D), 0.0f);
    linear_backward(bl.lin[3], dh.data(), N, datt.data());
    std::vector<float> dq(static_cast<size_t>(N * NQ * D)), dk(static_cast<size_t>(N * NKV * D)),
        dv(static_cast<size_t>(N * NKV * D));
    attention_bwd(datt.data(), c.q.data(), NQ * D, c.k.data(), c.v.data(), NKV * D, c.P.data(), B, T, NQ, NKV, D,
                  1.0f / std::sqrt(static_cast<float>(D)), dq.data(), dk.data(), dv.data());
    rope_apply(dq.data(), N, T, NQ * D, NQ, D, cos_t.data(), sin_t.data(), true);
    rope_apply(dk.data(), N, T, NKV * D, NKV, D, cos_t.data(), sin_t.data(), true);
    if (cfg.qk_norm) {
      std::vector<float> dqr(dq.size(), 0.0f), dkr(dk.size(), 0.0f);
      norm_backward(bl.qnorm, dq.data(), c.qraw.data(), nullptr, c.qrstd.data(), N * NQ, D, dqr.data());
      norm_backward(bl.knorm, dk.data(), c.kraw.data(), nullptr, c.krstd.data(), N * NKV, D, dkr.data());
      dq.swap(dqr);
      dk.swap(dkr);
    }
    std::fill(dxn.begin(), dxn.end(), 0.0f);
    linear_backward(bl.lin[0], dq.data(), N, dxn.data());
    linear_backward(bl.lin[1], dk.data(), N, dxn.data());
    linear_backward(bl.lin[2], dv.data(), N, dxn.data());
    norm_backward(bl.norm1, dxn.data(), c.h0.data(), nullptr, c.rstd1.data(), N, Hs, dh.data());
    c = LayerCache{};
  }

  std::vector<float> embed_tokens(const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
    const int64_t Hs = H(), V = cfg.vocab_size;
    CALQ_CHECK(B > 0 && T > 0 && static_cast<int64_t>(tokens.size()) == B * T,
               "train: batch of {} tokens is not {} x {}", tokens.size(), B, T);
    CALQ_CHECK(T <= cfg.max_position_embeddings, "train: sequence length {} exceeds max_position_embeddings {}", T,
               cfg.max_position_embeddings);
    CALQ_CHECK(!cfg.sliding_window || *cfg.sliding_window >= T || gpt2,
               "train: sequence length {} exceeds the sliding window {}; use --seq-len {} or less", T,
               *cfg.sliding_window, *cfg.sliding_window);
    std::vector<float> h(static_cast<size_t>(B * T * Hs));
    for (int64_t r = 0; r < B * T; ++r) {
      const int32_t t = tokens[static_cast<size_t>(r)];
      CALQ_CHECK(t >= 0 && t < V, "train: token {} outside the vocabulary (size {})", t, V);
      std::copy_n(embed.data() + t * Hs, Hs, h.data() + r * Hs);
      if (gpt2)
        for (int64_t i = 0; i < Hs; ++i) h[r * Hs + i] += wpe[(r % T) * Hs + i];
    }
    return h;
  }

  // Runs the decoder and the final norm; returns the head input. keep: cache for backward.
  std::vector<float> trunk(const std::vector<int32_t>& tokens, int64_t B, int64_t T, bool keep,
                           std::vector<float>& hf, std::vector<float>& fmean, std::vector<float>& frstd) {
    ensure_rope(T);
    hf = embed_tokens(tokens, B, T);
    cache.assign(blocks.size(), LayerCache{});
    for (size_t l = 0; l < blocks.size(); ++l) {
      if (gpt2)
        gpt2_layer(l, hf, B, T, keep);
      else
        llama_layer(l, hf, B, T, keep);
    }
    const int64_t N = B * T;
    fmean.resize(N);
    frstd.resize(N);
    std::vector<float> xf(static_cast<size_t>(N * H()));
    norm_forward(final_norm, hf.data(), N, H(), xf.data(), fmean.data(), frstd.data());
    return xf;
  }

  int64_t head_chunk() const { return std::max<int64_t>(1, (int64_t{1} << 22) / cfg.vocab_size); }

  double loss(const std::vector<int32_t>& tokens, int64_t B, int64_t T, bool backward, float grad_scale) {
    std::vector<float> hf, fmean, frstd;
    std::vector<float> xf = trunk(tokens, B, T, backward, hf, fmean, frstd);
    const int64_t N = B * T, Hs = H(), V = cfg.vocab_size;
    const std::vector<int32_t> targets = shifted_targets(tokens, B, T);
    int64_t M = 0;
    for (int32_t t : targets) M += t >= 0;
    CALQ_CHECK(M > 0, "train: sequences of {} token(s) have no next-token target", T);
    // The head runs in row chunks (logits of one chunk at a time): forward, loss, backward.
    Linear& hd = linears[head];
    std::vector<float> xq;  // quantized head input (hooks see all rows at once)
    const float* xin = xf.data();
    if (hooks) {
      xq = xf;
      hooks->input(head, xq.data(), N, Hs);
      xin = xq.data();
    }
    const float* w = hd.w;
    if (hooks)
      if (const float* wq = hooks->weight(head)) w = wq;
    Hooks* saved = hooks;
    const int64_t chunk = head_chunk();
    std::vector<float> hdA, hdB;  // head LoRA gradients summed over the chunks
    if (backward && hd.lora) {
      hdA.assign(hd.lora->A.value.size(), 0.0f);
      hdB.assign(hd.lora->B.value.size(), 0.0f);
    }
    std::vector<float> dxf(backward ? static_cast<size_t>(N * Hs) : 0, 0.0f);
    double total = 0;
    std::vector<float> lg, dlg;
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t n = std::min(chunk, N - r0);
      lg.resize(static_cast<size_t>(n * V));
      linear_fwd(xin + r0 * Hs, n, Hs, w, nullptr, V, lg.data());
      bool lora_on = hd.lora && (!saved || saved->lora_enabled());
      LinearCache& c = lcache[head];
      c.lora = lora_on;
      if (lora_on) {
        Lora& lo = *hd.lora;
        c.xl.assign(xin + r0 * Hs, xin + (r0 + n) * Hs);
        c.keep.clear();
        if (training && lo.dropout > 0) {
          std::mt19937_64 rng(step_seed * 1000003ULL + head * 7919ULL + static_cast<uint64_t>(r0) + 17);
          std::uniform_real_distribution<float> uni(0.0f, 1.0f);
          c.keep.resize(c.xl.size());
          const float s = 1.0f / (1.0f - lo.dropout);
          for (size_t j = 0; j < c.xl.size(); ++j) {
            c.keep[j] = uni(rng) >= lo.dropout;
            c.xl[j] = c.keep[j] ? c.xl[j] * s : 0.0f;
          }
        }
        if (r0 == 0) {
          c.Aq.resize(lo.A.value.size());
          c.Bq.resize(lo.B.value.size());
          if (!(saved && saved->lora_weights(head, lo.A, lo.B, c.Aq.data(), c.Bq.data()))) {
            c.Aq.clear();
            c.Bq.clear();
          }
        }
        const float* A = c.Aq.empty() ? lo.A.value.data() : c.Aq.data();
        const float* Bm = c.Bq.empty() ? lo.B.value.data() : c.Bq.data();
        c.u.resize(static_cast<size_t>(n * lo.rank));
        lora_fwd(c.xl.data(), n, Hs, A, Bm, lo.rank, V, lo.scale, c.u.data(), lg.data());
      }
      if (backward) dlg.resize(lg.size());
      total += cross_entropy(lg.data(), n, V, targets.data() + r0, backward ? dlg.data() : nullptr,
                             grad_scale / static_cast<float>(M));
      if (backward) {
        std::vector<float> dpart(static_cast<size_t>(n * Hs), 0.0f);
        linear_bwd_input(dlg.data(), n, V, w, Hs, dpart.data());
        if (lora_on) {
          Lora& lo = *hd.lora;
          const float* A = c.Aq.empty() ? lo.A.value.data() : c.Aq.data();
          const float* Bm = c.Bq.empty() ? lo.B.value.data() : c.Bq.data();
          std::vector<float> dxl(dpart.size(), 0.0f);
          lora_bwd(dlg.data(), c.xl.data(), c.u.data(), n, Hs, A, Bm, lo.rank, V, lo.scale, hdA.data(), hdB.data(),
                   dxl.data());
          const float s = lo.dropout > 0 ? 1.0f / (1.0f - lo.dropout) : 1.0f;
          for (size_t j = 0; j < dxl.size(); ++j) dpart[j] += c.keep.empty() ? dxl[j] : (c.keep[j] ? dxl[j] * s : 0.0f);
        }
        std::copy(dpart.begin(), dpart.end(), dxf.begin() + r0 * Hs);
      }
    }
    if (backward && lcache[head].lora) {
      Lora& lo = *hd.lora;
      if (hooks) hooks->lora_grads(head, hdA.data(), static_cast<int64_t>(hdA.size()), hdB.data(),
                                   static_cast<int64_t>(hdB.size()));
      for (size_t j = 0; j < hdA.size(); ++j) lo.A.grad[j] += hdA[j];
      for (size_t j = 0; j < hdB.size(); ++j) lo.B.grad[j] += hdB[j];
    }
    lcache[head] = LinearCache{};
    if (backward) {
      std::vector<float> dh(static_cast<size_t>(N * Hs), 0.0f);
      norm_backward(final_norm, dxf.data(), hf.data(), fmean.data(), frstd.data(), N, Hs, dh.data());
      for (size_t l = blocks.size(); l-- > 0;) {
        if (gpt2)
          gpt2_layer_backward(l, dh, B, T);
        else
          llama_layer_backward(l, dh, B, T);
      }
      for (auto& c : lcache) c = LinearCache{};
    }
    return total / static_cast<double>(M);
  }

  std::vector<float> logits(const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
    std::vector<float> hf, fmean, frstd;
    std::vector<float> xf = trunk(tokens, B, T, false, hf, fmean, frstd);
    const int64_t N = B * T;
    std::vector<float> out(static_cast<size_t>(N * cfg.vocab_size));
    linear_forward(head, xf.data(), N, out.data(), false);
    lcache[head] = LinearCache{};
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
namespace {

using TensorMap = std::map<std::string, std::vector<float>>;

std::vector<float> take(TensorMap& t, const std::string& name) {
  auto it = t.find(name);
  CALQ_CHECK(it != t.end(), "train: tensor {} is missing from the model", name);
  return std::move(it->second);
}

}  // namespace

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::from_tensors(const io::ModelConfig& cfg, TensorMap t, const ModelOptions& opts) {
  CALQ_CHECK(!cfg.is_moe(), "train: {} is a mixture-of-experts model; training supports dense gpt2, llama, mistral, "
                            "qwen2 and qwen3 models", cfg.model_type);
  auto im = std::make_unique<Impl>();
  Impl& m = *im;
  m.cfg = cfg;
  m.opts = opts;
  m.gpt2 = cfg.arch == Arch::Gpt2;
  if (m.gpt2) {
    const std::string act = cfg.raw.value("activation_function", std::string("gelu_new"));
    CALQ_CHECK(act == "gelu_new" || act == "gelu_pytorch_tanh",
               "train: gpt2 activation_function '{}' is not supported (gelu_new)", act);
  } else {
    CALQ_CHECK(cfg.hidden_act == "silu", "train: hidden_act '{}' is not supported (silu)", cfg.hidden_act);
    engine::rope_inv_freq(cfg, 1);
  }
  const int64_t Hs = cfg.hidden_size, V = cfg.vocab_size;
  const LoraOptions& lo = opts.lora;
  CALQ_CHECK(lo.rank >= 0, "--lora-rank must be at least 0, got {}", lo.rank);
  CALQ_CHECK(lo.dropout >= 0 && lo.dropout < 1, "--lora-dropout must be in [0, 1), got {}", lo.dropout);
  std::regex re;
  try {
    re = std::regex(lo.targets, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    fail("--lora-targets '{}' is not a valid regular expression: {}", lo.targets, e.what());
  }
  std::mt19937_64 rng(lo.seed * 0x9E3779B97F4A7C15ULL + 1);
  auto add_linear = [&](const std::string& name, std::vector<float> W, int64_t in, int64_t out, bool transposed,
                        std::vector<float> bias, bool adapt) {
    Linear L;
    L.name = name;
    L.in = in;
    L.out = out;
    L.W = transposed ? transpose(W, in, out) : std::move(W);
    L.bias = std::move(bias);
    if (adapt && lo.rank > 0) {
      auto a = std::make_unique<Lora>();
      a->rank = lo.rank;
      a->scale = static_cast<float>(lo.alpha / static_cast<double>(lo.rank));
      a->dropout = static_cast<float>(lo.dropout);
      a->A.name = name + ".lora_A.weight";
      a->A.shape = {lo.rank, in};
      a->A.decay = lo.decay;
      a->B.name = name + ".lora_B.weight";
      a->B.shape = {out, lo.rank};
      a->B.decay = lo.decay;
      // PEFT's default: kaiming_uniform(a=sqrt(5)) on [rank, in], i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0.
      const float bound = 1.0f / std::sqrt(static_cast<float>(in));
      std::uniform_real_distribution<float> uni(-bound, bound);
      a->A.value.resize(static_cast<size_t>(lo.rank * in));
      for (float& x : a->A.value) x = uni(rng);
      a->B.value.assign(static_cast<size_t>(out * lo.rank), 0.0f);
      a->A.grad.assign(a->A.value.size(), 0.0f);
      a->B.grad.assign(a->B.value.size(), 0.0f);
      L.lora = std::move(a);
    }
    m.linears.push_back(std::move(L));
    return m.linears.size() - 1;
  };
  auto opt_bias = [&](const std::string& name) {
    auto it = t.find(name);
    if (it == t.end()) return std::vector<float>{};
    return std::move(it->second);
  };
  auto add_norm = [&](const std::string& name, int64_t dim, bool with_bias) {
    Norm n;
    n.name = name;
    n.trainable = opts.train_norms;
    n.w.name = name + ".weight";
    n.w.shape = {dim};
    n.w.value = take(t, name + ".weight");
    CALQ_CHECK(static_cast<int64_t>(n.w.value.size()) == dim, "train: {} has {} values, expected {}", n.w.name,
               n.w.value.size(), dim);
    if (with_bias) {
      n.b.name = name + ".bias";
      n.b.shape = {dim};
      n.b.value = take(t, name + ".bias");
    }
    if (n.trainable) {
      n.w.grad.assign(n.w.value.size(), 0.0f);
      n.b.grad.assign(n.b.value.size(), 0.0f);
    }
    m.norms.push_back(std::move(n));
    return m.norms.size() - 1;
  };
  auto adapt = [&](const std::string& name) { return std::regex_search(name, re); };
  bool matched = false;
  auto lin = [&](const std::string& name, int64_t in, int64_t out) {
    const bool a = adapt(name);
    matched = matched || a;
    auto W = take(t, name + ".weight");
    CALQ_CHECK(static_cast<int64_t>(W.size()) == in * out, "train: {}.weight has {} values, expected {} x {}", name,
               W.size(), out, in);
    return add_linear(name, std::move(W), in, out, m.gpt2, opt_bias(name + ".bias"), a);
  };
  if (m.gpt2) {
    m.embed = take(t, "transformer.wte.weight");
    m.wpe = take(t, "transformer.wpe.weight");
    const int64_t I = cfg.intermediate_size;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      const std::string p = "transformer.h." + std::to_string(l) + ".";
      Block b;
      b.norm1 = add_norm(p + "ln_1", Hs, true);
      b.lin.push_back(lin(p + "attn.c_attn", Hs, 3 * Hs));
      b.lin.push_back(lin(p + "attn.c_proj", Hs, Hs));
      b.norm2 = add_norm(p + "ln_2", Hs, true);
      b.lin.push_back(lin(p + "mlp.c_fc", Hs, I));
      b.lin.push_back(lin(p + "mlp.c_proj", I, Hs));
      m.blocks.push_back(std::move(b));
    }
    m.final_norm = add_norm("transformer.ln_f", Hs, true);
  } else {
    m.embed = take(t, "model.embed_tokens.weight");
    const int64_t D = cfg.head_dim, NQ = cfg.num_attention_heads, NKV = cfg.num_key_value_heads,
                  I = cfg.intermediate_size;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Block b;
      b.norm1 = add_norm(p + "input_layernorm", Hs, false);
      for (const char* n : {"q_proj", "k_proj", "v_proj"})
        b.lin.push_back(lin(p + "self_attn." + n, Hs, (n[0] == 'q' ? NQ : NKV) * D));
      b.lin.push_back(lin(p + "self_attn.o_proj", NQ * D, Hs));
      if (cfg.qk_norm) {
        b.qnorm = add_norm(p + "self_attn.q_norm", D, false);
        b.knorm = add_norm(p + "self_attn.k_norm", D, false);
      }
      b.norm2 = add_norm(p + "post_attention_layernorm", Hs, false);
      b.lin.push_back(lin(p + "mlp.gate_proj", Hs, I));
      b.lin.push_back(lin(p + "mlp.up_proj", Hs, I));
      b.lin.push_back(lin(p + "mlp.down_proj", I, Hs));
      m.blocks.push_back(std::move(b));
    }
    m.final_norm = add_norm("model.norm", Hs, false);
  }
  CALQ_CHECK(static_cast<int64_t>(m.embed.size()) == V * Hs, "train: embedding has {} values, expected {} x {}",
             m.embed.size(), V, Hs);
  CALQ_CHECK(lo.rank == 0 || matched || lo.head,
             "--lora-targets '{}' matches no linear module of this {} model (module names look like {}); use e.g. "
             "'{}'",
             lo.targets, cfg.model_type, m.linears.front().name, m.gpt2 ? "c_attn|c_proj|c_fc" : "q_proj|v_proj");
  // The head: lm_head.weight, or the embedding when tied / absent.
  const bool tied = cfg.tie_word_embeddings || !t.count("lm_head.weight");
  size_t hi;
  if (tied) {
    hi = add_linear("lm_head", {}, Hs, V, false, {}, lo.head);
  } else {
    auto W = take(t, "lm_head.weight");
    CALQ_CHECK(static_cast<int64_t>(W.size()) == V * Hs, "train: lm_head.weight has {} values, expected {} x {}",
               W.size(), V, Hs);
    hi = add_linear("lm_head", std::move(W), Hs, V, false, {}, lo.head);
  }
  m.head = hi;
  for (auto& L : m.linears) L.w = L.W.empty() ? m.embed.data() : L.W.data();
  m.lcache.resize(m.linears.size());
  return Model(std::move(im));
}

Model Model::load(const std::filesystem::path& dir, const ModelOptions& opts) {
  auto src = native::Model::open(dir);
  CALQ_CHECK(!src.quantized(), "train: {} is a quantized model; train LoRA adapters on the unquantized base model",
             dir.string());
  TensorMap t;
  for (const auto& e : src.entries()) t[e.name] = with_context("loading " + e.name, [&] { return src.load_f32(e.name); });
  return with_context(dir.string(), [&] { return from_tensors(src.config(), std::move(t), opts); });
}

const io::ModelConfig& Model::config() const { return impl_->cfg; }
const ModelOptions& Model::options() const { return impl_->opts; }
std::vector<Linear>& Model::linears() { return impl_->linears; }
const std::vector<Linear>& Model::linears() const { return impl_->linears; }
std::vector<Norm>& Model::norms() { return impl_->norms; }

std::vector<Param*> Model::params() {
  std::vector<Param*> p;
  for (auto& L : impl_->linears)
    if (L.lora) {
      p.push_back(&L.lora->A);
      p.push_back(&L.lora->B);
    }
  for (auto& n : impl_->norms)
    if (n.trainable) {
      p.push_back(&n.w);
      if (!n.b.value.empty()) p.push_back(&n.b);
    }
  return p;
}

int64_t Model::num_lora_params() const {
  int64_t n = 0;
  for (const auto& L : impl_->linears)
    if (L.lora) n += L.lora->A.numel() + L.lora->B.numel();
  return n;
}

int64_t Model::num_trainable_params() {
  int64_t n = 0;
  for (Param* p : params()) n += p->numel();
  return n;
}

int64_t Model::num_frozen_params() const {
  int64_t n = static_cast<int64_t>(impl_->embed.size() + impl_->wpe.size());
  for (const auto& L : impl_->linears) n += static_cast<int64_t>(L.W.size() + L.bias.size());
  for (const auto& nm : impl_->norms)
    if (!nm.trainable) n += nm.w.numel() + nm.b.numel();
  return n;
}

void Model::set_hooks(Hooks* h) { impl_->hooks = h; }
void Model::set_training(bool on) { impl_->training = on; }
void Model::set_step_seed(uint64_t s) { impl_->step_seed = s; }

double Model::loss(const std::vector<int32_t>& tokens, int64_t B, int64_t T, bool backward, float grad_scale) {
  return impl_->loss(tokens, B, T, backward, grad_scale);
}

std::vector<float> Model::logits(const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
  return impl_->logits(tokens, B, T);
}

Model::Scores Model::score(const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
  const auto lg = logits(tokens, B, T);
  const int64_t V = impl_->cfg.vocab_size;
  const auto targets = shifted_targets(tokens, B, T);
  Scores s;
  s.nll = cross_entropy(lg.data(), B * T, V, targets.data(), nullptr, 1.0f);
  for (int64_t r = 0; r < B * T; ++r) {
    if (targets[static_cast<size_t>(r)] < 0) continue;
    const float* l = lg.data() + r * V;
    const int64_t am = std::max_element(l, l + V) - l;
    s.correct += am == targets[static_cast<size_t>(r)];
    ++s.scored;
  }
  return s;
}

void Model::zero_grad() {
  for (Param* p : params()) std::fill(p->grad.begin(), p->grad.end(), 0.0f);
}

}  // namespace calq::train
