// Activation-aware input-channel scaling for RTN (in the spirit of AWQ, Lin et al. 2023): for the
// modules that read one input X (q/k/v, or gate/up, or down, or o), choose per input channel
// s_j = mean|x_j|^α (normalised so that sqrt(max s · min s) = 1), quantize W·diag(s) with RTN and
// use Ŵ = Q(W·diag(s))·diag(s)⁻¹; α is searched on a grid to minimise the output error
// Σ_modules ‖X Wᵀ − X Ŵᵀ‖² on calibration inputs. α = 0 is plain RTN, so the result is never worse
// than plain RTN on those inputs. Where the scaled weight is stored, diag(s)⁻¹ must be folded into
// the operation producing X (an RMSNorm weight, v_proj's rows, up_proj's rows); the pipeline does
// that, and skips modules with nothing to fold into.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "calq/quant/rtn.h"

namespace calq::quant {

struct ActScaleOptions {
  int grid = 20;          // α ∈ {0, 1/grid, ..., (grid-1)/grid}
  RtnOptions rtn;         // the RTN applied to the scaled weights. α is searched without clipping;
                          // then, if rtn.clip_search, the clip search (each column's error weighted
                          // by its input channel's mean square) runs for that α and is kept when it
                          // lowers the output error
};

struct ActScaleModule {
  const float* w;         // rows × cols (cols = input features)
  int64_t rows;
};

struct ActScaleResult {
  double alpha = 0;
  std::vector<float> scales;         // s_j, length cols
  double error = 0, error_plain = 0; // output error of the result and of plain absmax RTN (α = 0)
  bool clipped = false;              // the clip search was kept (it lowered the output error)
  std::vector<QuantizedWeight> q;    // per module: RTN of W·diag(s)
};

// The second moment of the input that the output error is measured with: ‖X·Dᵀ‖² = tr(D·H·Dᵀ)
// with H = XᵀX (any positive multiple gives the same α). `full`: cols × cols row-major; or only
// its diagonal (length cols, e.g. Σx_j² from activation statistics without Hessians), which
// treats channels as uncorrelated.
struct InputMoment {
  std::vector<float> h;
  bool diagonal = false;
};

// x: calibration inputs (tokens × cols), mean_abs: mean |x_j| per channel over all calibration
// tokens (from the activation statistics).
ActScaleResult act_scale_search(const std::vector<ActScaleModule>& modules, int64_t cols, const float* x,
                                int64_t tokens, const std::vector<double>& mean_abs, const Format& f,
                                const ActScaleOptions& opt, const std::string& what = "module");
// The same search with the error measured through the input's second moment (no raw inputs).
ActScaleResult act_scale_search(const std::vector<ActScaleModule>& modules, int64_t cols, const InputMoment& h,
                                const std::vector<double>& mean_abs, const Format& f, const ActScaleOptions& opt,
                                const std::string& what = "module");

// The scales of exponent α for these channel means (normalised to a geometric middle of 1;
// channels never active get the floor 1e-6 × the largest mean).
std::vector<float> act_scales(const std::vector<double>& mean_abs, double alpha);

// RTN of W·diag(s) for given scales (after they were adjusted, e.g. so that a folded norm weight is
// exact in its storage type). With `diag` (the input's per-channel mean squares) and
// rtn.clip_search, the clip search weights each column by its input's mean square, diag/s².
QuantizedWeight scaled_rtn(const ActScaleModule& m, int64_t cols, const std::vector<float>& s, const Format& f,
                           const RtnOptions& rtn, const std::string& what, const std::vector<double>* diag = nullptr);
std::vector<double> moment_diagonal(const InputMoment& h, int64_t cols);
// The output error tr(D H Dᵀ) of Ŵ against W (D = W − Ŵ).
// RTN options for the modules of one group: with nvfp4, the fp32 tensor scale of the scaled
// weights shared across the group (engines fuse q/k/v and gate/up into one GEMM).
RtnOptions group_rtn_options(const std::vector<ActScaleModule>& modules, int64_t cols, const std::vector<float>& s,
                             const Format& f, const RtnOptions& rtn);
double moment_error(const float* w, const std::vector<float>& w_hat, int64_t rows, int64_t cols, const InputMoment& h);

}  // namespace calq::quant
