#include "worker/model/config.h"

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/model/config_fields.h"

namespace joule {
namespace {

using config_internal::Fields;
using config_internal::json;

constexpr char kSupportedArchitectures[] =
    "Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM, DeepseekV3ForCausalLM";

struct FamilyInfo {
  ModelFamily family;
  const char* architecture;
  const char* model_type;
  // Hugging Face defaults for the fields a config may omit.
  float rms_norm_eps;
  float rope_theta;
  int64_t max_position_embeddings;
};

constexpr FamilyInfo kFamilies[] = {
    {ModelFamily::kQwen3Moe, "Qwen3MoeForCausalLM", "qwen3_moe", 1e-6f, 10000.0f, 32768},
    {ModelFamily::kQwen2Moe, "Qwen2MoeForCausalLM", "qwen2_moe", 1e-6f, 10000.0f, 32768},
    {ModelFamily::kMixtral, "MixtralForCausalLM", "mixtral", 1e-5f, 1e6f, 4096 * 32},
    {ModelFamily::kDeepseekV3, "DeepseekV3ForCausalLM", "deepseek_v3", 1e-6f, 10000.0f, 4096},
};

const FamilyInfo* FamilyByArchitecture(const std::string& arch) {
  for (const FamilyInfo& f : kFamilies) {
    if (f.architecture == arch) return &f;
  }
  return nullptr;
}

const FamilyInfo* FamilyByModelType(const std::string& type) {
  for (const FamilyInfo& f : kFamilies) {
    if (f.model_type == type) return &f;
  }
  return nullptr;
}

// rope_scaling (older configs) / rope_parameters (newer ones): only plain RoPE
// is implemented. A "default" entry may carry rope_theta.
absl::Status CheckRope(const Fields& f, absl::string_view field, float* rope_theta) {
  const json* v = f.Find(field);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_object()) return f.TypeError(field, "an object or null", *v);
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    auto it = v->find(key);
    if (it != v->end() && !it->is_null()) {
      if (!it->is_string()) return f.TypeError(absl::StrCat(field, ".", key), "a string", *it);
      type = it->get<std::string>();
      break;
    }
  }
  if (type != "default") {
    return f.Error(field, absl::StrCat("requests rope type '", type,
                                       "', which is not supported (only plain RoPE)"));
  }
  auto theta = v->find("rope_theta");
  if (theta != v->end() && !theta->is_null()) {
    ASSIGN_OR_RETURN(*rope_theta, f.AsPositiveFloat(absl::StrCat(field, ".rope_theta"), *theta));
  }
  for (const auto& [key, value] : v->items()) {
    if (key != "rope_type" && key != "type" && key != "rope_theta") {
      return f.Error(field, absl::StrCat("has key '", key,
                                         "'; rope scaling is not supported (only plain RoPE)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const FamilyInfo*> ResolveFamily(const Fields& f,
                                                std::string* architecture,
                                                std::string* model_type) {
  const FamilyInfo* family = nullptr;
  if (const json* archs = f.Find("architectures")) {
    if (!archs->is_array() || archs->empty()) {
      return f.TypeError("architectures", "a non-empty list of strings", *archs);
    }
    if (!(*archs)[0].is_string()) {
      return f.TypeError("architectures", "a non-empty list of strings", (*archs)[0]);
    }
    *architecture = (*archs)[0].get<std::string>();
    family = FamilyByArchitecture(*architecture);
    if (family == nullptr) {
      return f.Error("architectures", absl::StrCat("names unsupported architecture '",
                                                   *architecture, "' (supported: ",
                                                   kSupportedArchitectures, ")"));
    }
  }
  ASSIGN_OR_RETURN(std::optional<std::string> type, f.OptString("model_type"));
  if (type) {
    const FamilyInfo* by_type = FamilyByModelType(*type);
    if (family == nullptr) {
      if (by_type == nullptr) {
        return f.Error("model_type", absl::StrCat("names unsupported model type '", *type,
                                                  "' (supported: ", kSupportedArchitectures,
                                                  ")"));
      }
      family = by_type;
    } else if (by_type != family) {
      return f.Error("model_type",
                     absl::StrCat("is '", *type, "' but architectures[0] is '", *architecture,
                                  "' (expected model_type '", family->model_type, "')"));
    }
  }
  if (family == nullptr) {
    return f.Error("architectures", absl::StrCat("is required (neither 'architectures' nor "
                                                 "'model_type' is set; supported: ",
                                                 kSupportedArchitectures, ")"));
  }
  *architecture = std::string(family->architecture);
  *model_type = std::string(family->model_type);
  return family;
}

// bos_token_id and eos_token_id (an id or a list).
absl::Status ParseSpecialTokens(const Fields& f, ModelConfig* c) {
  ASSIGN_OR_RETURN(std::vector<int64_t> bos, f.IntOrList("bos_token_id"));
  c->bos_token_id = bos.empty() ? -1 : bos[0];
  ASSIGN_OR_RETURN(c->eos_token_ids, f.IntOrList("eos_token_id"));
  // Ids past vocab_size occur in the wild (added tokens), so only the sign is checked.
  for (int64_t id : bos) {
    if (id < 0) return f.Error("bos_token_id", absl::StrCat("must be non-negative, got ", id));
  }
  for (int64_t id : c->eos_token_ids) {
    if (id < 0) return f.Error("eos_token_id", absl::StrCat("must be non-negative, got ", id));
  }
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::IsMoeLayer(int layer) const {
  if (family == ModelFamily::kDeepseekV3) return num_experts > 0 && layer >= first_k_dense_replace;
  if (num_experts <= 0 || decoder_sparse_step <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) {
    return false;
  }
  return (layer + 1) % decoder_sparse_step == 0;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source) {
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": must be a JSON object, got ", root.type_name()));
  }
  const Fields f(root, source);
  ModelConfig c;
  ASSIGN_OR_RETURN(const FamilyInfo* family,
                   ResolveFamily(f, &c.architecture, &c.model_type));
  c.family = family->family;
  if (c.family == ModelFamily::kDeepseekV3) {
    RETURN_IF_ERROR(config_internal::ParseDeepseekV3(f, &c));
    RETURN_IF_ERROR(ParseSpecialTokens(f, &c));
    return c;
  }
  const bool is_mixtral = c.family == ModelFamily::kMixtral;

  // Fields whose presence alone means the engine would compute something else.
  if (const json* q = f.Find("quantization_config")) {
    std::string method = "?";
    if (q->is_object() && q->contains("quant_method") && (*q)["quant_method"].is_string()) {
      method = (*q)["quant_method"].get<std::string>();
    }
    return f.Error("quantization_config",
                   absl::StrCat("is set (quant_method '", method, "'): quantized ", c.architecture,
                                " checkpoints are not supported (block FP8 is read for "
                                "DeepseekV3ForCausalLM only)"));
  }
  ASSIGN_OR_RETURN(std::optional<std::string> act, f.OptString("hidden_act"));
  if (act && *act != "silu") {
    return f.Error("hidden_act", absl::StrCat("is '", *act, "'; only 'silu' is supported"));
  }

  // Sizes.
  ASSIGN_OR_RETURN(c.vocab_size, f.Positive("vocab_size", std::nullopt));
  ASSIGN_OR_RETURN(c.hidden_size, f.Positive("hidden_size", std::nullopt));
  ASSIGN_OR_RETURN(int64_t layers, f.Positive("num_hidden_layers", std::nullopt, true));
  c.num_layers = static_cast<int>(layers);
  ASSIGN_OR_RETURN(int64_t heads, f.Positive("num_attention_heads", std::nullopt, true));
  c.num_attention_heads = static_cast<int>(heads);
  ASSIGN_OR_RETURN(int64_t kv_heads, f.Positive("num_key_value_heads", heads, true));
  c.num_key_value_heads = static_cast<int>(kv_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return f.Error("num_key_value_heads",
                   absl::StrCat("(", c.num_key_value_heads,
                                ") must divide num_attention_heads (", c.num_attention_heads,
                                ")"));
  }
  // Qwen3 declares head_dim; Mixtral honours it when present; otherwise hidden / heads.
  ASSIGN_OR_RETURN(std::optional<int64_t> head_dim, f.OptInt("head_dim"));
  if (!head_dim) {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return f.Error("hidden_size",
                     absl::StrCat("(", c.hidden_size, ") must be divisible by num_attention_heads (",
                                  c.num_attention_heads, ") when head_dim is not set"));
    }
    head_dim = c.hidden_size / c.num_attention_heads;
  }
  ASSIGN_OR_RETURN(int64_t hd, f.Positive("head_dim", head_dim, true));
  if (hd % 2 != 0) {
    return f.Error("head_dim", absl::StrCat("must be even for rotary embeddings, got ", hd));
  }
  c.head_dim = static_cast<int>(hd);
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   f.Positive("max_position_embeddings", family->max_position_embeddings));
  ASSIGN_OR_RETURN(c.rms_norm_eps, f.PositiveFloat("rms_norm_eps", family->rms_norm_eps));
  ASSIGN_OR_RETURN(c.rope_theta, f.PositiveFloat("rope_theta", family->rope_theta));
  RETURN_IF_ERROR(CheckRope(f, "rope_scaling", &c.rope_theta));
  RETURN_IF_ERROR(CheckRope(f, "rope_parameters", &c.rope_theta));
  ASSIGN_OR_RETURN(c.tie_word_embeddings, f.Bool("tie_word_embeddings", false));

  // Attention variant.
  switch (c.family) {
    case ModelFamily::kQwen3Moe: {
      c.qk_norm = true;
      ASSIGN_OR_RETURN(bool bias, f.Bool("attention_bias", false));
      if (bias) {
        // HF Qwen3MoeAttention then also biases o_proj, which the engine lacks.
        return f.Error("attention_bias", "is true; attention biases are not supported for "
                                         "Qwen3-MoE (they include o_proj)");
      }
      c.attention_bias = false;
      break;
    }
    case ModelFamily::kQwen2Moe: {
      // q/k/v carry biases, o_proj none (HF Qwen2MoeAttention; newer configs name it qkv_bias).
      ASSIGN_OR_RETURN(c.attention_bias, f.Bool("qkv_bias", true));
      break;
    }
    case ModelFamily::kMixtral:
    case ModelFamily::kDeepseekV3:  // parsed by ParseDeepseekV3 instead
      c.attention_bias = false;
      break;
  }
  if (is_mixtral) {
    ASSIGN_OR_RETURN(std::optional<int64_t> window, f.OptInt("sliding_window"));
    if (window) {
      if (*window <= 0 || *window > std::numeric_limits<int>::max()) {
        return f.Error("sliding_window", absl::StrCat("must be a positive integer or null, got ",
                                                      *window));
      }
      c.sliding_window = static_cast<int>(*window);
    }
  } else {
    ASSIGN_OR_RETURN(bool use_window, f.Bool("use_sliding_window", false));
    if (use_window) {
      return f.Error("use_sliding_window",
                     "is true; per-layer sliding-window attention (max_window_layers) is not "
                     "supported");
    }
    if (const json* types = f.Find("layer_types")) {
      if (!types->is_array()) return f.TypeError("layer_types", "a list of strings", *types);
      for (const json& t : *types) {
        if (!t.is_string() || t.get<std::string>() != "full_attention") {
          return f.Error("layer_types", absl::StrCat("contains ", t.dump(),
                                                     "; only 'full_attention' is supported"));
        }
      }
    }
    c.sliding_window = 0;
  }

  // Experts.
  if (is_mixtral) {
    ASSIGN_OR_RETURN(int64_t experts, f.Positive("num_local_experts", std::nullopt, true));
    c.num_experts = static_cast<int>(experts);
    ASSIGN_OR_RETURN(c.intermediate_size, f.Positive("intermediate_size", std::nullopt));
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;  // Mixtral always renormalizes the top-k weights
    c.decoder_sparse_step = 1;
  } else {
    ASSIGN_OR_RETURN(int64_t experts, f.Positive("num_experts", std::nullopt, true));
    c.num_experts = static_cast<int>(experts);
    ASSIGN_OR_RETURN(c.moe_intermediate_size, f.Positive("moe_intermediate_size", std::nullopt));
    ASSIGN_OR_RETURN(c.norm_topk_prob, f.Bool("norm_topk_prob", false));
    ASSIGN_OR_RETURN(int64_t step, f.Positive("decoder_sparse_step", 1, true));
    c.decoder_sparse_step = static_cast<int>(step);
    if (const json* only = f.Find("mlp_only_layers")) {
      if (!only->is_array()) return f.TypeError("mlp_only_layers", "a list of integers", *only);
      for (const json& e : *only) {
        if (!e.is_number_integer()) return f.TypeError("mlp_only_layers", "a list of integers", e);
        ASSIGN_OR_RETURN(int64_t layer, f.AsInt("mlp_only_layers", e));
        if (layer < 0 || layer >= c.num_layers) {
          return f.Error("mlp_only_layers",
                         absl::StrCat("entry ", layer, " is out of range [0, ", c.num_layers,
                                      ")"));
        }
        c.mlp_only_layers.push_back(static_cast<int>(layer));
      }
      std::sort(c.mlp_only_layers.begin(), c.mlp_only_layers.end());
      c.mlp_only_layers.erase(std::unique(c.mlp_only_layers.begin(), c.mlp_only_layers.end()),
                              c.mlp_only_layers.end());
    }
    // intermediate_size sizes the dense layers; needed only when there are some.
    bool has_dense = false;
    for (int l = 0; l < c.num_layers; ++l) has_dense = has_dense || !c.IsMoeLayer(l);
    ASSIGN_OR_RETURN(std::optional<int64_t> inter, f.OptInt("intermediate_size"));
    if (inter || has_dense) {
      ASSIGN_OR_RETURN(c.intermediate_size, f.Positive("intermediate_size", std::nullopt));
    }
    if (c.family == ModelFamily::kQwen2Moe) {
      ASSIGN_OR_RETURN(c.shared_expert_intermediate_size,
                       f.Positive("shared_expert_intermediate_size", std::nullopt));
    }
  }
  ASSIGN_OR_RETURN(int64_t top_k, f.Positive("num_experts_per_tok", std::nullopt, true));
  if (top_k > c.num_experts) {
    return f.Error("num_experts_per_tok",
                   absl::StrCat("(", top_k, ") must not exceed the number of experts (",
                                c.num_experts, ")"));
  }
  c.num_experts_per_tok = static_cast<int>(top_k);

  RETURN_IF_ERROR(ParseSpecialTokens(f, &c));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  std::string path = model_dir.empty() || model_dir.back() == '/' ? model_dir + "config.json"
                                                                  : model_dir + "/config.json";
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(absl::StrCat("model config not found: ", path));
    }
    return text.status();
  }
  return ParseModelConfig(*text, path);
}

}  // namespace joule
