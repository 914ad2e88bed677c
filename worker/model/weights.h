// The model's weights as views into a checkpoint.
//
// BF16, F32 and FP8 (E4M3, with their F32 block scales) matrices are used in
// place from the mmapped files (zero copy); F16 matrices and every vector
// (norms, biases) are widened to F32 once at load.
// A rank that serves expert parallelism loads only the experts it owns: the
// others are never touched, so their pages never become resident.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors.h"
#include "kernels/cpu/gemm.h"
#include "worker/model/config.h"

namespace joule {

// A [out_features, in_features] matrix in nn.Linear layout.
struct Linear {
  const void* w = nullptr;
  kernels::cpu::WeightType type = kernels::cpu::WeightType::kBF16;
  int64_t out_features = 0;
  int64_t in_features = 0;
  std::vector<float> bias;      // empty when the layer has none
  std::vector<float> owned_f32; // backing store when widened from F16
  // kF8E4M3: the checkpoint's `<name>_scale_inv`, F32
  // [ceil(out / blocks.rows), ceil(in / blocks.cols)] (kernels/params/gemm.h).
  const float* scale_inv = nullptr;
  kernels::WeightBlocks blocks;
  std::vector<float> owned_scale_inv;  // backing store when the scales were not F32
  // Bytes of the matrix (and bias); with `as`, of the matrix stored in that
  // type instead (a GPU keeps every matrix in BF16, except FP8 ones, which
  // every device keeps as stored).
  size_t bytes(std::optional<kernels::DType> as = std::nullopt) const;
};

// SwiGLU MLP: down(silu(gate(x)) * up(x)).
struct MlpWeights {
  Linear gate, up, down;
  bool loaded = false;  // false for experts this rank does not own
};

struct LayerWeights {
  std::vector<float> input_norm;
  std::vector<float> post_attention_norm;
  std::vector<float> q_norm, k_norm;  // Qwen3 only
  Linear q_proj, k_proj, v_proj, o_proj;  // DeepSeek-V3: q_proj (no query LoRA) and o_proj

  // DeepSeek-V3's multi-head latent attention (config.mla sizes):
  Linear q_a_proj;                 // [q_lora_rank, hidden], with a query LoRA
  std::vector<float> q_a_norm;     // [q_lora_rank] q_a_layernorm
  Linear q_b_proj;                 // [heads * qk_head_dim, q_lora_rank]
  Linear kv_a_proj;                // kv_a_proj_with_mqa: [kv_lora_rank + qk_rope_head_dim, hidden]
  std::vector<float> kv_a_norm;    // [kv_lora_rank] kv_a_layernorm
  Linear kv_b_proj;                // [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]

  bool is_moe = false;
  MlpWeights dense;               // when !is_moe
  Linear router;                  // [num_experts, hidden]
  std::vector<float> router_bias;  // DeepSeek-V3's e_score_correction_bias [num_experts]
  std::vector<MlpWeights> experts;  // [num_experts]
  MlpWeights shared_expert;       // Qwen2-MoE's shared_expert, DeepSeek-V3's shared_experts
  Linear shared_expert_gate;      // [1, hidden]; Qwen2-MoE only
};

struct WeightLoadOptions {
  // Returns true for the (layer, expert) pairs this rank holds. Empty: all.
  std::function<bool(int layer, int expert)> owns_expert;
};

class ModelWeights {
 public:
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& model_dir,
                                                            const WeightLoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const Linear& embed_tokens() const { return embed_; }  // [vocab, hidden]
  const Linear& lm_head() const { return lm_head_; }      // [vocab, hidden]; tied: embed
  const std::vector<float>& final_norm() const { return final_norm_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Bytes of weights one token touches in a decode step (attention, router,
  // dense/shared MLPs, top_k experts per MoE layer, lm_head; MLA's absorbed
  // kv_b_proj as worker/model/mla.h keeps it) — the numerator of the
  // memory-bandwidth roofline.
  // With `as`: the matrices counted as stored in that type (the device's).
  size_t ActiveBytesPerToken(std::optional<kernels::DType> as = std::nullopt) const;
  // Bytes of every loaded weight.
  size_t LoadedBytes() const;

 private:
  ModelWeights() = default;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  Linear embed_;
  Linear lm_head_;
  std::vector<float> final_norm_;
  std::vector<LayerWeights> layers_;
};

}  // namespace joule
