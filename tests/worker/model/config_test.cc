#include "worker/model/config.h"

#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// Modelled on Qwen/Qwen3-30B-A3B config.json.
constexpr char kQwen3Moe[] = R"({
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": true,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "output_router_logits": false,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

// Modelled on Qwen/Qwen1.5-MoE-A2.7B config.json.
constexpr char kQwen2Moe[] = R"({
  "architectures": ["Qwen2MoeForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 8192,
  "max_window_layers": 21,
  "model_type": "qwen2_moe",
  "num_attention_heads": 16,
  "num_hidden_layers": 24,
  "num_key_value_heads": 16,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0.dev0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936,
  "decoder_sparse_step": 1,
  "moe_intermediate_size": 1408,
  "shared_expert_intermediate_size": 5632,
  "num_experts_per_tok": 4,
  "num_experts": 60,
  "norm_topk_prob": false,
  "output_router_logits": false,
  "router_aux_loss_coef": 0.001
})";

// Modelled on mistralai/Mixtral-8x7B-v0.1 config.json.
constexpr char kMixtral[] = R"({
  "architectures": ["MixtralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mixtral",
  "num_attention_heads": 32,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "num_local_experts": 8,
  "output_router_logits": false,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1e6,
  "router_aux_loss_coef": 0.02,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

// deepseek-ai/DeepSeek-V3's config.json, as published (auto_map left out).
constexpr char kDeepseekV3[] = R"({
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "pretraining_tp": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
  "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
})";

// Replaces the line of `field` (which must be present) in `json` with `value`,
// or removes the field when `value` is empty.
std::string With(std::string json, const std::string& field, const std::string& value) {
  const std::string key = "\"" + field + "\":";
  size_t pos = json.find(key);
  EXPECT_NE(pos, std::string::npos) << field;
  if (pos == std::string::npos) return json;
  size_t end = json.find('\n', pos);
  std::string line = json.substr(pos, end - pos);
  bool comma = !line.empty() && line.back() == ',';
  std::string repl = value.empty() ? "\"_removed_\": 0" : key + " " + value;
  json.replace(pos, end - pos, repl + (comma ? "," : ""));
  return json;
}

// Adds `"field": value` as the first field.
std::string Plus(const std::string& json, const std::string& field, const std::string& value) {
  return "{\"" + field + "\": " + value + "," + json.substr(1);
}

void ExpectRejected(const std::string& json, const std::vector<std::string>& needles) {
  auto c = ParseModelConfig(json, "/models/x/config.json");
  ASSERT_FALSE(c.ok()) << "accepted; expected an error containing " << needles[0];
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("/models/x/config.json"));
  for (const std::string& n : needles) {
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(n));
  }
}

TEST(ModelConfigTest, ParsesQwen3Moe) {
  auto c = ParseModelConfig(kQwen3Moe);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, ModelFamily::kQwen3Moe);
  EXPECT_EQ(c->architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(c->model_type, "qwen3_moe");
  EXPECT_EQ(c->vocab_size, 151936);
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->intermediate_size, 6144);
  EXPECT_EQ(c->moe_intermediate_size, 768);
  EXPECT_EQ(c->shared_expert_intermediate_size, 0);
  EXPECT_EQ(c->num_layers, 48);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 128);  // explicit, != 2048 / 32
  EXPECT_EQ(c->max_position_embeddings, 40960);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->num_experts, 128);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_EQ(c->decoder_sparse_step, 1);
  EXPECT_THAT(c->mlp_only_layers, IsEmpty());
  EXPECT_EQ(c->bos_token_id, 151643);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(151645));
  for (int l = 0; l < 48; ++l) EXPECT_TRUE(c->IsMoeLayer(l)) << l;
}

TEST(ModelConfigTest, ParsesQwen2Moe) {
  auto c = ParseModelConfig(kQwen2Moe);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, ModelFamily::kQwen2Moe);
  EXPECT_EQ(c->model_type, "qwen2_moe");
  EXPECT_EQ(c->head_dim, 128);  // 2048 / 16
  EXPECT_EQ(c->num_key_value_heads, 16);
  EXPECT_EQ(c->intermediate_size, 5632);
  EXPECT_EQ(c->moe_intermediate_size, 1408);
  EXPECT_EQ(c->shared_expert_intermediate_size, 5632);
  EXPECT_EQ(c->num_experts, 60);
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_TRUE(c->attention_bias);  // q/k/v biases
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->sliding_window, 0);  // use_sliding_window is false
  EXPECT_EQ(c->max_position_embeddings, 8192);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(151643));
  for (int l = 0; l < 24; ++l) EXPECT_TRUE(c->IsMoeLayer(l)) << l;

  auto no_bias = ParseModelConfig(Plus(kQwen2Moe, "qkv_bias", "false"));
  ASSERT_TRUE(no_bias.ok()) << no_bias.status();
  EXPECT_FALSE(no_bias->attention_bias);
}

TEST(ModelConfigTest, ParsesMixtral) {
  auto c = ParseModelConfig(kMixtral);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, ModelFamily::kMixtral);
  EXPECT_EQ(c->model_type, "mixtral");
  EXPECT_EQ(c->vocab_size, 32000);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->num_experts, 8);
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->moe_intermediate_size, 14336);
  EXPECT_EQ(c->shared_expert_intermediate_size, 0);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
  for (int l = 0; l < 32; ++l) EXPECT_TRUE(c->IsMoeLayer(l)) << l;

  auto windowed = ParseModelConfig(With(kMixtral, "sliding_window", "4096"));
  ASSERT_TRUE(windowed.ok()) << windowed.status();
  EXPECT_EQ(windowed->sliding_window, 4096);
}

TEST(ModelConfigTest, FamilyDefaults) {
  // Optional fields absent: Hugging Face defaults per family.
  std::string qwen = kQwen3Moe;
  for (const char* f : {"num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                        "max_position_embeddings", "norm_topk_prob", "decoder_sparse_step",
                        "mlp_only_layers", "attention_bias", "tie_word_embeddings",
                        "bos_token_id", "eos_token_id", "hidden_act"}) {
    qwen = With(qwen, f, "");
  }
  auto c = ParseModelConfig(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.f);
  EXPECT_EQ(c->max_position_embeddings, 32768);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_EQ(c->decoder_sparse_step, 1);
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_THAT(c->eos_token_ids, IsEmpty());

  std::string mixtral = kMixtral;
  for (const char* f : {"rms_norm_eps", "rope_theta", "num_key_value_heads"}) {
    mixtral = With(mixtral, f, "");
  }
  auto m = ParseModelConfig(mixtral);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_FLOAT_EQ(m->rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(m->rope_theta, 1e6f);
  EXPECT_EQ(m->num_key_value_heads, 32);
}

TEST(ModelConfigTest, ArchitectureFromModelTypeWhenAbsent) {
  auto c = ParseModelConfig(With(kMixtral, "architectures", ""));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "MixtralForCausalLM");
  ExpectRejected(With(With(kMixtral, "architectures", ""), "model_type", ""),
                 {"'architectures'", "is required"});
}

TEST(ModelConfigTest, EosTokenList) {
  auto c = ParseModelConfig(With(kQwen3Moe, "eos_token_id", "[151645, 151643]"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(151645, 151643));
  c = ParseModelConfig(With(kQwen3Moe, "eos_token_id", "null"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, IsEmpty());
  ExpectRejected(With(kQwen3Moe, "eos_token_id", "\"</s>\""),
                 {"field 'eos_token_id' must be an integer or a list of integers, got string"});
  ExpectRejected(With(kQwen3Moe, "eos_token_id", "[1, 2.5]"), {"'eos_token_id'"});
  ExpectRejected(With(kQwen3Moe, "bos_token_id", "-3"), {"'bos_token_id'", "non-negative"});
}

TEST(ModelConfigTest, IsMoeLayerFollowsSparseStepAndMlpOnlyLayers) {
  std::string json = With(kQwen3Moe, "decoder_sparse_step", "2");
  json = With(json, "num_hidden_layers", "8");
  json = With(json, "mlp_only_layers", "[3, 4]");
  auto c = ParseModelConfig(json);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->decoder_sparse_step, 2);
  EXPECT_THAT(c->mlp_only_layers, ElementsAre(3, 4));
  // (layer + 1) % 2 == 0 -> 1, 3, 5, 7; minus mlp-only layer 3.
  std::vector<bool> moe;
  for (int l = 0; l < 8; ++l) moe.push_back(c->IsMoeLayer(l));
  EXPECT_THAT(moe, ElementsAre(false, true, false, false, false, true, false, true));

  // Dense layers exist, so intermediate_size becomes required.
  ExpectRejected(With(json, "intermediate_size", ""), {"'intermediate_size'", "required"});
  // All-MoE models do not need it.
  auto all_moe = ParseModelConfig(With(kQwen3Moe, "intermediate_size", ""));
  ASSERT_TRUE(all_moe.ok()) << all_moe.status();
  EXPECT_EQ(all_moe->intermediate_size, 0);
}

TEST(ModelConfigTest, RejectsUnsupportedArchitecture) {
  ExpectRejected(With(With(kQwen3Moe, "architectures", "[\"LlamaForCausalLM\"]"), "model_type",
                      "\"llama\""),
                 {"unsupported architecture 'LlamaForCausalLM'", "Qwen3MoeForCausalLM",
                  "MixtralForCausalLM", "'architectures'"});
  ExpectRejected(With(kQwen3Moe, "architectures", "[]"), {"'architectures'"});
  ExpectRejected(With(kQwen3Moe, "architectures", "\"Qwen3MoeForCausalLM\""),
                 {"'architectures'", "got string"});
  ExpectRejected(With(kQwen3Moe, "model_type", "\"mixtral\""),
                 {"'model_type'", "'mixtral'", "qwen3_moe"});
}

TEST(ModelConfigTest, RejectsWrongTypesNamingTheField) {
  ExpectRejected(With(kQwen3Moe, "num_experts", "\"128\""),
                 {"config.json: field 'num_experts' must be an integer, got string"});
  ExpectRejected(With(kQwen3Moe, "hidden_size", "2048.5"),
                 {"field 'hidden_size' must be an integer, got number 2048.5"});
  ExpectRejected(With(kQwen3Moe, "norm_topk_prob", "1"),
                 {"field 'norm_topk_prob' must be a boolean"});
  ExpectRejected(With(kQwen3Moe, "rms_norm_eps", "\"1e-6\""),
                 {"field 'rms_norm_eps' must be a number"});
  ExpectRejected(With(kQwen3Moe, "mlp_only_layers", "3"), {"field 'mlp_only_layers'"});
  ExpectRejected(With(kQwen3Moe, "vocab_size", "99999999999999999999"), {"'vocab_size'"});
}

TEST(ModelConfigTest, RejectsMissingRequiredFields) {
  for (const char* f : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_experts", "num_experts_per_tok", "moe_intermediate_size"}) {
    SCOPED_TRACE(f);
    ExpectRejected(With(kQwen3Moe, f, ""), {std::string("field '") + f + "' is required"});
  }
  ExpectRejected(With(kQwen2Moe, "shared_expert_intermediate_size", ""),
                 {"'shared_expert_intermediate_size'", "required"});
  ExpectRejected(With(kMixtral, "num_local_experts", ""), {"'num_local_experts'", "required"});
  ExpectRejected(With(kMixtral, "intermediate_size", ""), {"'intermediate_size'", "required"});
}

TEST(ModelConfigTest, RejectsBadValuesNamingTheField) {
  ExpectRejected(With(kQwen3Moe, "rope_scaling", R"({"rope_type": "yarn", "factor": 4.0})"),
                 {"'rope_scaling'", "yarn", "not supported"});
  ExpectRejected(With(kQwen3Moe, "rope_scaling", R"({"type": "linear", "factor": 2.0})"),
                 {"'rope_scaling'", "linear"});
  ExpectRejected(With(kQwen3Moe, "hidden_act", "\"gelu\""), {"'hidden_act'", "gelu", "silu"});
  ExpectRejected(With(kQwen3Moe, "num_key_value_heads", "5"),
                 {"'num_key_value_heads'", "must divide num_attention_heads"});
  ExpectRejected(With(kQwen3Moe, "num_experts_per_tok", "129"),
                 {"'num_experts_per_tok'", "must not exceed"});
  ExpectRejected(With(kQwen3Moe, "num_experts_per_tok", "0"),
                 {"'num_experts_per_tok'", "must be positive"});
  ExpectRejected(With(kMixtral, "num_experts_per_tok", "9"), {"'num_experts_per_tok'"});
  ExpectRejected(With(kQwen3Moe, "num_experts", "0"), {"'num_experts'", "positive"});
  ExpectRejected(With(kQwen3Moe, "hidden_size", "-2048"), {"'hidden_size'", "positive"});
  ExpectRejected(With(kQwen3Moe, "moe_intermediate_size", "0"), {"'moe_intermediate_size'"});
  ExpectRejected(With(kQwen3Moe, "head_dim", "0"), {"'head_dim'"});
  ExpectRejected(With(kQwen3Moe, "head_dim", "127"), {"'head_dim'", "even"});
  ExpectRejected(With(kQwen3Moe, "rms_norm_eps", "0"), {"'rms_norm_eps'"});
  ExpectRejected(With(kQwen3Moe, "decoder_sparse_step", "0"), {"'decoder_sparse_step'"});
  ExpectRejected(With(kQwen3Moe, "mlp_only_layers", "[0, 48]"),
                 {"'mlp_only_layers'", "48", "out of range"});
  ExpectRejected(With(kQwen3Moe, "mlp_only_layers", "[-1]"), {"'mlp_only_layers'"});
  ExpectRejected(Plus(kQwen3Moe, "quantization_config", R"({"quant_method": "fp8"})"),
                 {"'quantization_config'", "quant_method 'fp8'", "Qwen3MoeForCausalLM",
                  "not supported"});
  ExpectRejected(Plus(kMixtral, "quantization_config", R"({"quant_method": "awq", "bits": 4})"),
                 {"'quantization_config'", "'awq'", "not supported"});
  ExpectRejected(With(kQwen2Moe, "use_sliding_window", "true"),
                 {"'use_sliding_window'", "not supported"});
  ExpectRejected(With(kQwen3Moe, "attention_bias", "true"), {"'attention_bias'"});
  ExpectRejected(With(kMixtral, "sliding_window", "0"), {"'sliding_window'"});
  ExpectRejected(With(With(kQwen2Moe, "hidden_size", "2050"), "num_attention_heads", "16"),
                 {"'hidden_size'", "divisible"});
  ExpectRejected(Plus(kQwen2Moe, "layer_types", R"(["sliding_attention", "full_attention"])"),
                 {"'layer_types'"});
  // Positive numbers a float cannot hold: they became inf or 0 (tests/fuzz/model_config_fuzzer).
  ExpectRejected(With(kQwen3Moe, "rope_theta", "1e39"), {"'rope_theta'", "float range"});
  ExpectRejected(With(kQwen3Moe, "rms_norm_eps", "1e-50"), {"'rms_norm_eps'", "float range"});
  ExpectRejected(With(kQwen3Moe, "rope_scaling", R"({"rope_type": "default", "rope_theta": 1e300})"),
                 {"'rope_scaling.rope_theta'", "float range"});
  ExpectRejected(Plus(kQwen3Moe, "rope_parameters", R"({"rope_theta": 1e-300})"),
                 {"'rope_parameters.rope_theta'", "float range"});
}

TEST(ModelConfigTest, PlainRopeParametersAccepted) {
  auto c = ParseModelConfig(
      Plus(With(kQwen3Moe, "rope_theta", ""), "rope_parameters",
           R"({"rope_type": "default", "rope_theta": 5000000.0})"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FLOAT_EQ(c->rope_theta, 5e6f);
  ExpectRejected(Plus(kQwen3Moe, "rope_parameters", R"({"rope_type": "yarn", "factor": 4})"),
                 {"'rope_parameters'"});
}

TEST(ModelConfigTest, ParsesDeepseekV3) {
  auto c = ParseModelConfig(kDeepseekV3);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, ModelFamily::kDeepseekV3);
  EXPECT_EQ(c->architecture, "DeepseekV3ForCausalLM");
  EXPECT_EQ(c->model_type, "deepseek_v3");
  EXPECT_TRUE(c->UsesMla());
  EXPECT_EQ(c->vocab_size, 129280);
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->num_layers, 61);
  EXPECT_EQ(c->num_attention_heads, 128);
  EXPECT_EQ(c->num_key_value_heads, 128);
  EXPECT_EQ(c->head_dim, 64);  // transformers' DeepseekV3Config.head_dim: the rope part
  EXPECT_EQ(c->mla.q_lora_rank, 1536);
  EXPECT_EQ(c->mla.kv_lora_rank, 512);
  EXPECT_EQ(c->mla.qk_nope_head_dim, 128);
  EXPECT_EQ(c->mla.qk_rope_head_dim, 64);
  EXPECT_EQ(c->mla.qk_head_dim(), 192);
  EXPECT_EQ(c->mla.v_head_dim, 128);
  EXPECT_TRUE(c->mla.rope_interleave);
  EXPECT_FLOAT_EQ(c->mla.latent_norm_eps, 1e-6f);
  EXPECT_EQ(c->router, RouterKind::kNoauxTc);
  EXPECT_EQ(c->num_experts, 256);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FLOAT_EQ(c->routed_scaling_factor, 2.5f);
  EXPECT_EQ(c->moe_intermediate_size, 2048);
  EXPECT_EQ(c->intermediate_size, 18432);
  EXPECT_EQ(c->shared_expert_intermediate_size, 2048);  // one shared expert
  EXPECT_FALSE(c->shared_expert_gated);
  EXPECT_EQ(c->first_k_dense_replace, 3);
  EXPECT_EQ(c->num_nextn_predict_layers, 1);
  for (int l = 0; l < 61; ++l) EXPECT_EQ(c->IsMoeLayer(l), l >= 3) << l;
  EXPECT_EQ(c->max_position_embeddings, 163840);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_TRUE(c->yarn.enabled);
  EXPECT_FLOAT_EQ(c->yarn.factor, 40.0f);
  EXPECT_EQ(c->yarn.original_max_position_embeddings, 4096);
  EXPECT_FLOAT_EQ(c->yarn.beta_fast, 32.0f);
  EXPECT_FLOAT_EQ(c->yarn.beta_slow, 1.0f);
  EXPECT_TRUE(c->yarn.truncate);
  EXPECT_FLOAT_EQ(c->yarn.attention_factor, 1.0f);  // mscale == mscale_all_dim
  // 192^-0.5 * (0.1 ln 40 + 1)^2, as DeepseekV3Attention scales its scores.
  const double mscale = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c->mla.softmax_scale, mscale * mscale / std::sqrt(192.0), 1e-7);
  EXPECT_TRUE(c->fp8.enabled);
  EXPECT_EQ(c->fp8.block_rows, 128);
  EXPECT_EQ(c->fp8.block_cols, 128);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1));
}

TEST(ModelConfigTest, DeepseekV3Variants) {
  // No query LoRA (DeepSeek-V2-Lite's form): null, not absent and not 0.
  auto no_lora = ParseModelConfig(With(kDeepseekV3, "q_lora_rank", "null"));
  ASSERT_TRUE(no_lora.ok()) << no_lora.status();
  EXPECT_EQ(no_lora->mla.q_lora_rank, 0);
  // BF16 weights, plain RoPE: the softmax scale is qk_head_dim^-0.5.
  auto plain = ParseModelConfig(With(With(kDeepseekV3, "quantization_config", ""), "rope_scaling", "null"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->fp8.enabled);
  EXPECT_FALSE(plain->yarn.enabled);
  EXPECT_NEAR(plain->mla.softmax_scale, 1.0 / std::sqrt(192.0), 1e-8);
  // transformers 5 spells it rope_parameters, rope_theta inside.
  auto v5 = ParseModelConfig(Plus(With(With(kDeepseekV3, "rope_scaling", ""), "rope_theta", ""),
                                  "rope_parameters",
                                  R"({"rope_type": "yarn", "rope_theta": 50000, "factor": 40,
                                      "original_max_position_embeddings": 4096, "mscale": 1.0,
                                      "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2})"));
  ASSERT_TRUE(v5.ok()) << v5.status();
  EXPECT_FLOAT_EQ(v5->rope_theta, 50000.0f);
  EXPECT_FLOAT_EQ(v5->yarn.beta_fast, 16.0f);
  EXPECT_FLOAT_EQ(v5->yarn.beta_slow, 2.0f);
  // Without mscale_all_dim the scores keep qk_head_dim^-0.5, and cos/sin get get_mscale(factor).
  auto no_all_dim = ParseModelConfig(With(kDeepseekV3, "rope_scaling",
      R"({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0})"));
  ASSERT_TRUE(no_all_dim.ok()) << no_all_dim.status();
  EXPECT_NEAR(no_all_dim->yarn.attention_factor, 0.1 * std::log(40.0) + 1.0, 1e-6);
  EXPECT_NEAR(no_all_dim->mla.softmax_scale, 1.0 / std::sqrt(192.0), 1e-8);
  // Optional fields default as transformers' DeepseekV3Config does.
  auto defaults = ParseModelConfig(With(With(With(With(kDeepseekV3, "scoring_func", ""), "topk_method", ""),
                                             "norm_topk_prob", ""), "moe_layer_freq", ""));
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_TRUE(defaults->norm_topk_prob);
  EXPECT_EQ(defaults->router, RouterKind::kNoauxTc);
  // Every layer MoE: intermediate_size is then optional.
  auto all_moe = ParseModelConfig(With(With(kDeepseekV3, "first_k_dense_replace", "0"),
                                       "intermediate_size", ""));
  ASSERT_TRUE(all_moe.ok()) << all_moe.status();
  EXPECT_TRUE(all_moe->IsMoeLayer(0));
  // No shared experts.
  auto unshared = ParseModelConfig(With(kDeepseekV3, "n_shared_experts", "0"));
  ASSERT_TRUE(unshared.ok()) << unshared.status();
  EXPECT_EQ(unshared->shared_expert_intermediate_size, 0);
}

TEST(ModelConfigTest, DeepseekV3RefusalsNameTheField) {
  for (const char* f : {"kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                        "n_shared_experts", "first_k_dense_replace", "moe_intermediate_size",
                        "routed_scaling_factor", "q_lora_rank"}) {
    SCOPED_TRACE(f);
    ExpectRejected(With(kDeepseekV3, f, ""), {std::string("field '") + f + "' is required"});
  }
  ExpectRejected(With(kDeepseekV3, "q_lora_rank", "0"), {"'q_lora_rank'", "null"});
  ExpectRejected(With(kDeepseekV3, "q_lora_rank", "-1"), {"'q_lora_rank'"});
  ExpectRejected(With(kDeepseekV3, "kv_lora_rank", "\"512\""), {"'kv_lora_rank'", "integer"});
  ExpectRejected(With(kDeepseekV3, "num_key_value_heads", "64"),
                 {"'num_key_value_heads'", "must equal num_attention_heads"});
  ExpectRejected(With(kDeepseekV3, "qk_rope_head_dim", "63"), {"'qk_rope_head_dim'", "even"});
  ExpectRejected(With(kDeepseekV3, "hidden_act", "\"gelu\""), {"'hidden_act'", "gelu"});
  ExpectRejected(With(kDeepseekV3, "attention_bias", "true"), {"'attention_bias'"});
  ExpectRejected(Plus(kDeepseekV3, "partial_rotary_factor", "0.5"), {"'partial_rotary_factor'"});
  ExpectRejected(With(kDeepseekV3, "scoring_func", "\"softmax\""), {"'scoring_func'", "softmax", "sigmoid"});
  ExpectRejected(With(kDeepseekV3, "topk_method", "\"greedy\""), {"'topk_method'", "greedy", "noaux_tc"});
  ExpectRejected(With(kDeepseekV3, "n_group", "7"), {"'n_group'", "must divide n_routed_experts"});
  ExpectRejected(With(kDeepseekV3, "n_group", "256"), {"'n_group'", "top 2"});
  ExpectRejected(With(kDeepseekV3, "topk_group", "9"), {"'topk_group'", "exceeds n_group"});
  ExpectRejected(With(kDeepseekV3, "num_experts_per_tok", "129"),
                 {"'num_experts_per_tok'", "128 experts of the topk_group chosen groups"});
  ExpectRejected(With(kDeepseekV3, "moe_layer_freq", "2"), {"'moe_layer_freq'", "only 1"});
  ExpectRejected(With(kDeepseekV3, "routed_scaling_factor", "0"), {"'routed_scaling_factor'"});
  ExpectRejected(With(kDeepseekV3, "intermediate_size", ""), {"'intermediate_size'", "required"});
  ExpectRejected(With(kDeepseekV3, "num_nextn_predict_layers", "-1"), {"'num_nextn_predict_layers'"});
  // RoPE: default or YaRN, YaRN as transformers computes it.
  ExpectRejected(With(kDeepseekV3, "rope_scaling", R"({"type": "linear", "factor": 2.0})"),
                 {"'rope_scaling.rope_type'", "linear", "yarn"});
  ExpectRejected(With(kDeepseekV3, "rope_scaling",
                      R"({"type": "yarn", "factor": 20, "original_max_position_embeddings": 4096})"),
                 {"'rope_scaling.factor'", "163840/4096"});
  ExpectRejected(With(kDeepseekV3, "rope_scaling", R"({"type": "yarn", "factor": 40})"),
                 {"'rope_scaling.original_max_position_embeddings'", "required"});
  ExpectRejected(With(kDeepseekV3, "rope_scaling",
                      R"({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "low_freq_factor": 1})"),
                 {"'rope_scaling.low_freq_factor'", "not supported"});
  ExpectRejected(With(kDeepseekV3, "rope_scaling",
                      R"({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": "1"})"),
                 {"'rope_scaling.mscale'", "number"});
  ExpectRejected(With(kDeepseekV3, "rope_scaling", R"({"type": "default", "factor": 2})"),
                 {"'rope_scaling.factor'"});
  // Quantization: DeepSeek-V3's block FP8 only, the method named.
  ExpectRejected(With(kDeepseekV3, "quantization_config", R"({"quant_method": "awq", "bits": 4})"),
                 {"'quantization_config.quant_method'", "'awq'", "only 'fp8'"});
  ExpectRejected(With(kDeepseekV3, "quantization_config", R"({"fmt": "e4m3"})"),
                 {"'quantization_config.quant_method'", "required"});
  ExpectRejected(With(kDeepseekV3, "quantization_config",
                      R"({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]})"),
                 {"'quantization_config.fmt'", "e5m2"});
  ExpectRejected(With(kDeepseekV3, "quantization_config",
                      R"({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]})"),
                 {"'quantization_config.activation_scheme'", "static"});
  ExpectRejected(With(kDeepseekV3, "quantization_config", R"({"quant_method": "fp8", "weight_block_size": [128]})"),
                 {"'quantization_config.weight_block_size'", "two positive integers"});
  ExpectRejected(With(kDeepseekV3, "quantization_config", R"({"quant_method": "fp8", "weight_block_size": [128, 0]})"),
                 {"'quantization_config.weight_block_size'"});
  ExpectRejected(With(kDeepseekV3, "quantization_config", R"({"quant_method": "fp8"})"),
                 {"'quantization_config.weight_block_size'"});
  ExpectRejected(With(kDeepseekV3, "quantization_config",
                      R"({"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]})"),
                 {"'quantization_config.modules_to_not_convert'"});
  ExpectRejected(With(kDeepseekV3, "quantization_config", "\"fp8\""),
                 {"'quantization_config'", "object"});
}

TEST(ModelConfigTest, NotJsonOrNotObject) {
  ExpectRejected("{\"vocab_size\": ", {"not valid JSON"});
  ExpectRejected("[1, 2]", {"must be a JSON object"});
}

TEST(ModelConfigTest, LoadModelConfigReadsDirectory) {
  std::string tmpl = testing::TempDir() + "/config_test_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  const std::string dir = tmpl;

  auto missing = LoadModelConfig(dir);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(dir + "/config.json"));

  {
    std::ofstream out(dir + "/config.json");
    out << With(kMixtral, "hidden_act", "\"relu\"");
  }
  auto bad = LoadModelConfig(dir);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              AllOf(HasSubstr(dir + "/config.json"), HasSubstr("'hidden_act'")));

  {
    std::ofstream out(dir + "/config.json");
    out << kMixtral;
  }
  auto ok = LoadModelConfig(dir);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->family, ModelFamily::kMixtral);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace joule
