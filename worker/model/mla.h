// Multi-head latent attention (DeepSeek-V3's DeepseekV3Attention) over the
// paged KV cache, in the absorbed form for every step.
//
// Each token caches one row per layer: its normalized latent (kv_lora_rank)
// and its rotated rope key (qk_rope_head_dim), never the expanded per-head
// keys and values. kv_b_proj's key half is folded into the query (W_UK^T) and
// its value half applied after attention (W_UV), so attention is one KV head
// whose key is the whole cached row and whose value is its latent part:
//
//   q_latent[h] = [W_UK[h]^T q_nope[h], rope(q_pe[h])]       (kv_lora + rope)
//   out_latent[h] = softmax(q_latent[h] . row * scale) . latent  (kv_lora)
//   attn[h] = W_UV[h] out_latent[h]                           (v_head_dim)
//
// which equals the expanded form the Hugging Face code computes
// (tests/reference/reference.py checks both forms against each other).
// Prefill runs the same absorbed attention: it reads only the latent cache
// too, and a prefill chunk needs no expanded keys of the cached context.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/device/backend.h"
#include "worker/model/config.h"
#include "worker/model/device_weights.h"
#include "worker/model/forward_batch.h"
#include "worker/model/step_workspace.h"
#include "worker/model/weights.h"

namespace joule {

// Elements of one token's cache row per layer: kv_lora_rank + qk_rope_head_dim.
int64_t MlaCacheRow(const MlaConfig& mla);

// The RoPE inverse frequencies [head_dim / 2] of the model: the default
// 1 / theta^(2i / d), or YaRN's blend of interpolated and extrapolated
// frequencies (transformers' _compute_yarn_parameters, in F32).
std::vector<float> RopeInverseFrequencies(const ModelConfig& c);

// kv_b_proj split per head once at load (as vLLM does for its absorbed MLA),
// in the backend's memory, nn.Linear layout per head. BF16 checkpoints keep
// BF16; others (FP8 with its block scales applied, F32) are widened to F32,
// exactly: a dequantized E4M3 weight needs more bits than BF16 has. These
// matrices, not kv_b_proj, are what decode reads (ActiveBytesPerToken).
struct MlaLayerWeights {
  const void* uk_t = nullptr;  // [heads][kv_lora_rank][qk_nope_head_dim]: W_UK[h]^T
  const void* uv = nullptr;    // [heads][v_head_dim][kv_lora_rank]: W_UV[h]
  kernels::DType type = kernels::DType::kF32;
};

// The type the absorbed matrices of `kv_b_proj` are kept in, and their bytes per layer.
kernels::DType MlaAbsorbedType(const Linear& kv_b_proj);
size_t MlaAbsorbedBytes(const ModelConfig& c, const Linear& kv_b_proj);

class MlaWeights {
 public:
  // Empty for models without MLA.
  static absl::StatusOr<MlaWeights> Create(const ModelWeights& weights, device::Backend& backend);
  const MlaLayerWeights& layer(int l) const { return layers_[l]; }
  size_t bytes() const { return buffer_.bytes(); }

 private:
  device::Buffer buffer_;
  std::vector<MlaLayerWeights> layers_;
};

// What one layer's MLA reads: the step (metadata, shape, activations), the
// layer's cache and the RoPE table.
struct MlaStep {
  const StepMetadata& meta;
  const StepShape& shape;
  const StepActivations& act;
  void* cache = nullptr;  // this layer's [num_blocks, block_size, MlaCacheRow] rows
  kernels::DType cache_type = kernels::DType::kF32;
  int block_size = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
};

// act.x += o_proj(attention of act.h): the attention half of a decoder layer
// after its input norm.
absl::Status RunMlaAttention(device::Backend& dev, const ModelConfig& c, const LayerView& L,
                             const MlaLayerWeights& absorbed, const MlaStep& step);

}  // namespace joule
