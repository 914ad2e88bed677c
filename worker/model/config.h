// Model configuration parsed from a Hugging Face config.json.
//
// Supported architectures: Qwen3MoeForCausalLM, Qwen2MoeForCausalLM and
// MixtralForCausalLM. Anything the engine would silently misread (another
// architecture, rope scaling, unknown activation, ...) is rejected with a
// message naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace joule {

enum class ModelFamily { kQwen3Moe, kQwen2Moe, kMixtral };

struct ModelConfig {
  ModelFamily family = ModelFamily::kQwen3Moe;
  std::string architecture;  // e.g. "Qwen3MoeForCausalLM"
  std::string model_type;    // e.g. "qwen3_moe"

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP layers
  int64_t moe_intermediate_size = 0;  // each routed expert (Mixtral: intermediate_size)
  int64_t shared_expert_intermediate_size = 0;  // Qwen2-MoE; 0 = no shared expert
  int num_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;  // explicit in Qwen3, hidden/heads otherwise
  int64_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  int sliding_window = 0;  // 0: none (Mixtral may set it; Qwen only with use_sliding_window)

  bool attention_bias = false;  // q/k/v projection biases (Qwen2-MoE: true)
  bool qk_norm = false;         // per-head RMSNorm on q and k (Qwen3)
  bool tie_word_embeddings = false;

  int num_experts = 0;
  int num_experts_per_tok = 0;
  bool norm_topk_prob = false;  // renormalize top-k weights (Mixtral: always)
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;

  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  // True when layer `layer` uses the MoE block, false for a dense MLP (HF rule:
  // not in mlp_only_layers, num_experts > 0 and (layer + 1) % decoder_sparse_step == 0).
  bool IsMoeLayer(int layer) const;
};

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source = "config.json");
// Reads and parses DIR/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace joule
