// Mixture-of-experts tensors of a checkpoint, as calq names them everywhere else: one tensor per
// expert and projection (Qwen3-MoE model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight,
// Mixtral model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight), which is also the layout
// HF and vLLM load for these model types and the one calq writes.
//
// transformers 5 keeps a layer's experts fused, and some checkpoints are saved that way:
//   …experts.gate_up_proj [E, 2I, H]  (per expert: rows 0..I-1 are gate_proj, rows I..2I-1 up_proj)
//   …experts.down_proj    [E, H, I]
// with or without a ".weight" suffix, and for Mixtral under `mlp.` instead of `block_sparse_moe.`
// (router included). Every per-expert matrix is a contiguous run of bytes in such a bank, so the
// checkpoint exposes it as a view of the mmapped file and the fused names are never seen.
#pragma once

#include <string>
#include <vector>

#include "calq/io/config.h"
#include "calq/io/safetensors.h"

namespace calq::io {

// A tensor as calq sees it: `info` carries the exposed name, dtype and shape, and begin/end within
// the data buffer of the file that holds `stored` (a byte range inside it for an expert slice).
struct ExposedTensor {
  std::string stored;
  TensorInfo info;
};

// True for the name of a fused expert bank (…experts.gate_up_proj / …experts.down_proj, bare or
// with ".weight").
bool is_fused_expert_bank(const std::string& name);

// Maps a checkpoint's stored tensors to calq's names: fused banks become per-expert slices,
// Mixtral's `mlp.` block becomes `block_sparse_moe.`, everything else passes through. Then checks
// the expert tensors against the config: every sparse layer has its router ([E, H]) and all
// E x 3 expert projections with their shapes, and no expert tensor is left over (an expert index
// >= E, an unknown projection, experts in a dense layer, a bank that is not split, both fused and
// per-expert tensors in one layer). Errors name `label`, the layer and the tensor.
std::vector<ExposedTensor> expose_moe_tensors(const std::vector<TensorInfo>& stored, const ModelConfig& cfg,
                                              const std::string& label);

}  // namespace calq::io
