// Model configuration parsed from a Hugging Face config.json.
//
// Supported architectures: Qwen3MoeForCausalLM, Qwen2MoeForCausalLM,
// MixtralForCausalLM and DeepseekV3ForCausalLM (parsed and its weights
// validated; Model refuses it until multi-head latent attention exists).
// Anything the engine would silently misread (another architecture, rope
// scaling outside DeepSeek-V3's YaRN, unknown activation, a quantization other
// than DeepSeek-V3's block FP8, ...) is rejected with a message naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace joule {

enum class ModelFamily { kQwen3Moe, kQwen2Moe, kMixtral, kDeepseekV3 };

// How a MoE layer picks its experts (kernels::RouterMethod does the arithmetic).
enum class RouterKind {
  kSoftmax,  // softmax top-k (Qwen, Mixtral), renormalized if norm_topk_prob
  kNoauxTc,  // DeepSeek-V3: sigmoid, selection bias, group limit, routed_scaling_factor
};

// Multi-head latent attention (DeepSeek-V3, DeepseekV3Attention).
struct MlaConfig {
  int q_lora_rank = 0;  // 0: no query LoRA (config's null): q_proj instead of q_a/q_b
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  // Each head's rope part arrives as interleaved pairs (x0,x1),(x2,x3),...
  // and is reordered into halves before the rotate_half rotation.
  bool rope_interleave = true;
  // q_a_layernorm and kv_a_layernorm: DeepseekV3RMSNorm's default eps, not rms_norm_eps.
  float latent_norm_eps = 1e-6f;
  // Attention scores are scaled by qk_head_dim^-0.5, times mscale^2 under YaRN.
  float softmax_scale = 0.0f;

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
};

// YaRN RoPE scaling (rope_scaling / rope_parameters with rope_type "yarn"),
// as transformers' _compute_yarn_parameters reads it.
struct YarnConfig {
  bool enabled = false;
  float factor = 1.0f;  // equals max_position_embeddings / original_max_position_embeddings
  int64_t original_max_position_embeddings = 0;
  float beta_fast = 32.0f;
  float beta_slow = 1.0f;
  bool truncate = true;  // floor/ceil the correction range
  // cos and sin are multiplied by it (from mscale / mscale_all_dim, or attention_factor).
  float attention_factor = 1.0f;
};

// Block-scaled FP8 weights (quantization_config: quant_method fp8, fmt e4m3,
// activation_scheme dynamic): every projection is F8_E4M3 with an F32
// `<name>_scale_inv` per block_rows x block_cols block.
struct Fp8Quantization {
  bool enabled = false;
  int64_t block_rows = 128;  // weight_block_size[0]: output features
  int64_t block_cols = 128;  // weight_block_size[1]: input features
};

struct ModelConfig {
  ModelFamily family = ModelFamily::kQwen3Moe;
  std::string architecture;  // e.g. "Qwen3MoeForCausalLM"
  std::string model_type;    // e.g. "qwen3_moe"

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP layers
  int64_t moe_intermediate_size = 0;  // each routed expert (Mixtral: intermediate_size)
  // The shared expert(s) every token goes through: Qwen2-MoE's, gated by
  // sigmoid(shared_expert_gate(x)); DeepSeek-V3's n_shared_experts ungated, as
  // one MLP of moe_intermediate_size * n_shared_experts. 0 = none.
  int64_t shared_expert_intermediate_size = 0;
  bool shared_expert_gated = false;
  int num_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;  // explicit in Qwen3, hidden/heads otherwise; DeepSeek-V3: qk_rope_head_dim
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

  // DeepSeek-V3. Routing: noaux_tc over n_group groups of experts, keeping
  // topk_group of them, weights times routed_scaling_factor. Layers below
  // first_k_dense_replace are dense. Multi-token-prediction layers
  // (num_nextn_predict_layers, stored after the last layer) are ignored, as
  // transformers ignores them.
  RouterKind router = RouterKind::kSoftmax;
  int n_group = 1;
  int topk_group = 1;
  float routed_scaling_factor = 1.0f;
  int first_k_dense_replace = 0;
  int num_nextn_predict_layers = 0;
  MlaConfig mla;
  YarnConfig yarn;
  Fp8Quantization fp8;

  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  // True when layer `layer` uses the MoE block, false for a dense MLP (HF rule:
  // not in mlp_only_layers, num_experts > 0 and (layer + 1) % decoder_sparse_step == 0;
  // DeepSeek-V3: layer >= first_k_dense_replace).
  bool IsMoeLayer(int layer) const;
  // Multi-head latent attention instead of grouped-query attention.
  bool UsesMla() const { return family == ModelFamily::kDeepseekV3; }
};

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source = "config.json");
// Reads and parses DIR/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace joule
