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
  RtnOptions rtn;         // the RTN applied to the scaled weights (clip search allowed)
};

struct ActScaleModule {
  const float* w;         // rows × cols (cols = input features)
  int64_t rows;
};

struct ActScaleResult {
  double alpha = 0;
  std::vector<float> scales;         // s_j, length cols
  double error = 0, error_plain = 0; // output error with the chosen α and with α = 0
  std::vector<QuantizedWeight> q;    // per module: RTN of W·diag(s)
};

// x: calibration inputs (tokens × cols), mean_abs: mean |x_j| per channel over all calibration
// tokens (from the activation statistics).
ActScaleResult act_scale_search(const std::vector<ActScaleModule>& modules, int64_t cols, const float* x,
                                int64_t tokens, const std::vector<double>& mean_abs, const Format& f,
                                const ActScaleOptions& opt, const std::string& what = "module");

}  // namespace calq::quant
