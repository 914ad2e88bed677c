// config.json of DeepseekV3ForCausalLM (transformers' DeepseekV3Config), with
// the refusals of tests/reference/reference.py's DeepseekV3Config: the MLA and
// routing sizes are required (transformers' defaults are DeepSeek-V3's own
// sizes, which a config that omits them is unlikely to mean), and whatever the
// reference would compute differently is an error naming the field.
#include <cmath>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/config.h"
#include "worker/model/config_fields.h"

namespace joule::config_internal {
namespace {

constexpr char kArchitecture[] = "DeepseekV3ForCausalLM";

// An integer field >= minimum that fits an int. Absent (or null): `fallback`,
// or an error saying DeepSeek-V3 needs it.
absl::StatusOr<int> IntField(const Fields& f, absl::string_view field, int64_t minimum,
                             std::optional<int64_t> fallback = std::nullopt) {
  ASSIGN_OR_RETURN(std::optional<int64_t> v, f.OptInt(field));
  if (!v) v = fallback;
  if (!v) return f.Error(field, absl::StrCat("is required for ", kArchitecture));
  if (*v < minimum) {
    return f.Error(field, absl::StrCat("must be an integer >= ", minimum, ", got ", *v));
  }
  if (*v > std::numeric_limits<int>::max()) return f.Error(field, absl::StrCat("is too large: ", *v));
  return static_cast<int>(*v);
}

// A string field that must be `only` when present.
absl::Status OnlyString(const Fields& f, absl::string_view field, absl::string_view only,
                        absl::string_view why) {
  ASSIGN_OR_RETURN(std::optional<std::string> v, f.OptString(field));
  if (v && *v != only) {
    return f.Error(field, absl::StrCat("is '", *v, "'; only '", only, "' is supported (", why, ")"));
  }
  return absl::OkStatus();
}

// Keys of an object field outside `known` are refused: each changes the math.
absl::Status OnlyKeys(const Fields& f, const std::set<std::string>& known, absl::string_view what) {
  for (const auto& [key, value] : f.root().items()) {
    if (!known.count(key)) {
      return f.Error(key, absl::StrCat("is not supported (", what, ")"));
    }
  }
  return absl::OkStatus();
}

// transformers' get_mscale (YaRN): 0.1 * mscale * ln(scale) + 1, or 1 for scale <= 1.
double YarnMscale(double scale, double mscale = 1.0) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// rope_type "yarn": _compute_yarn_parameters' fields, and DeepseekV3Attention's
// softmax scale (qk_head_dim^-0.5 * get_mscale(factor, mscale_all_dim)^2).
absl::Status ParseYarn(const Fields& rs, ModelConfig* c) {
  RETURN_IF_ERROR(OnlyKeys(rs,
                           {"rope_type", "type", "rope_theta", "factor",
                            "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                            "mscale_all_dim", "attention_factor", "truncate"},
                           "a key YaRN as transformers computes it does not read"));
  YarnConfig& y = c->yarn;
  y.enabled = true;
  ASSIGN_OR_RETURN(const int original, IntField(rs, "original_max_position_embeddings", 1));
  y.original_max_position_embeddings = original;
  const double ratio =
      static_cast<double>(c->max_position_embeddings) / static_cast<double>(original);
  double factor = ratio;
  if (const json* v = rs.Find("factor")) {
    ASSIGN_OR_RETURN(const float given, rs.AsPositiveFloat("factor", *v));
    factor = v->get<double>();
    // transformers 4.5x replaced the factor by this ratio whenever
    // original_max_position_embeddings is set; 5.x reads the factor. They
    // agree only when the two match.
    if (std::fabs(factor - ratio) > 1e-9 * ratio) {
      return rs.Error("factor", absl::StrCat("is ", given, " but max_position_embeddings / "
                                             "original_max_position_embeddings is ",
                                             c->max_position_embeddings, "/", original,
                                             "; transformers releases disagree about which "
                                             "one applies"));
    }
  }
  y.factor = static_cast<float>(factor);
  ASSIGN_OR_RETURN(y.beta_fast, rs.PositiveFloat("beta_fast", 32.0f));
  ASSIGN_OR_RETURN(y.beta_slow, rs.PositiveFloat("beta_slow", 1.0f));
  ASSIGN_OR_RETURN(y.truncate, rs.Bool("truncate", true));
  std::optional<double> mscale, mscale_all_dim, attention_factor;
  for (auto [key, out] : {std::pair{"mscale", &mscale}, std::pair{"mscale_all_dim", &mscale_all_dim},
                          std::pair{"attention_factor", &attention_factor}}) {
    if (const json* v = rs.Find(key)) {
      if (!v->is_number()) return rs.TypeError(key, "a number", *v);
      *out = v->get<double>();
    }
  }
  // Python truthiness, as transformers tests `if mscale and mscale_all_dim`.
  const bool both = mscale.value_or(0.0) != 0.0 && mscale_all_dim.value_or(0.0) != 0.0;
  double cos_sin_factor = both ? YarnMscale(factor, *mscale) / YarnMscale(factor, *mscale_all_dim)
                               : YarnMscale(factor);
  if (attention_factor) cos_sin_factor = *attention_factor;
  y.attention_factor = static_cast<float>(cos_sin_factor);
  double softmax_scale = 1.0 / std::sqrt(static_cast<double>(c->mla.qk_head_dim()));
  if (mscale_all_dim.value_or(0.0) != 0.0) {
    const double m = YarnMscale(factor, *mscale_all_dim);
    softmax_scale *= m * m;
  }
  c->mla.softmax_scale = static_cast<float>(softmax_scale);
  // Finite and positive as floats, or the attention would compute inf or NaN.
  const char* scale_field = attention_factor ? "attention_factor" : "mscale";
  if (!(std::isfinite(y.attention_factor) && y.attention_factor > 0.0f)) {
    return rs.Error(scale_field, absl::StrCat("gives a cos/sin factor of ", cos_sin_factor,
                                              "; it must be a positive float"));
  }
  if (!(std::isfinite(c->mla.softmax_scale) && c->mla.softmax_scale > 0.0f)) {
    return rs.Error("mscale_all_dim", absl::StrCat("gives a softmax scale of ", softmax_scale,
                                                   "; it must be a positive float"));
  }
  return absl::OkStatus();
}

// rope_theta, and rope_scaling (or transformers 5's rope_parameters): default or yarn.
absl::Status ParseRope(const Fields& f, ModelConfig* c) {
  ASSIGN_OR_RETURN(c->rope_theta, f.PositiveFloat("rope_theta", 10000.0f));
  c->mla.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c->mla.qk_head_dim())));
  const char* field = f.Has("rope_scaling") ? "rope_scaling" : "rope_parameters";
  const json* v = f.Find(field);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_object()) return f.TypeError(field, "an object or null", *v);
  const Fields rs = f.Nested(field, *v);
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    ASSIGN_OR_RETURN(std::optional<std::string> t, rs.OptString(key));
    if (t) {
      type = *t;
      break;
    }
  }
  ASSIGN_OR_RETURN(c->rope_theta, rs.PositiveFloat("rope_theta", c->rope_theta));
  if (type == "yarn") return ParseYarn(rs, c);
  if (type != "default") {
    return rs.Error("rope_type", absl::StrCat("is '", type, "'; ", kArchitecture,
                                              " supports 'default' and 'yarn'"));
  }
  return OnlyKeys(rs, {"rope_type", "type", "rope_theta"}, "plain RoPE takes no scaling");
}

// quantization_config: DeepSeek-V3's block FP8 only.
absl::Status ParseQuantization(const Fields& f, ModelConfig* c) {
  const json* v = f.Find("quantization_config");
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_object()) return f.TypeError("quantization_config", "an object or null", *v);
  const Fields q = f.Nested("quantization_config", *v);
  ASSIGN_OR_RETURN(std::optional<std::string> method, q.OptString("quant_method"));
  if (!method) return q.Error("quant_method", "is required");
  if (*method != "fp8") {
    return q.Error("quant_method", absl::StrCat("is '", *method, "'; only 'fp8' (E4M3 weights with "
                                                "block scales, as DeepSeek-V3 ships) is supported"));
  }
  RETURN_IF_ERROR(OnlyString(q, "fmt", "e4m3", "FP8 E4M3 weights"));
  RETURN_IF_ERROR(OnlyString(q, "activation_scheme", "dynamic",
                             "the checkpoint stores no activation scales"));
  if (const json* skip = q.Find("modules_to_not_convert"); skip != nullptr && !skip->empty()) {
    return q.Error("modules_to_not_convert",
                   "is not supported (the FP8 tensors are DeepSeek-V3's projections)");
  }
  RETURN_IF_ERROR(OnlyKeys(q, {"quant_method", "fmt", "activation_scheme", "weight_block_size",
                               "modules_to_not_convert"},
                           "block FP8 as DeepSeek-V3 ships it has no such key"));
  const json* block = q.Find("weight_block_size");
  const bool pair = block != nullptr && block->is_array() && block->size() == 2 &&
                    (*block)[0].is_number_integer() && (*block)[1].is_number_integer() &&
                    (*block)[0].get<int64_t>() >= 1 && (*block)[1].get<int64_t>() >= 1;
  if (!pair) {
    return q.Error("weight_block_size",
                   absl::StrCat("must be two positive integers [rows, cols], got ",
                                block == nullptr ? "nothing" : block->dump()));
  }
  c->fp8.enabled = true;
  c->fp8.block_rows = (*block)[0].get<int64_t>();
  c->fp8.block_cols = (*block)[1].get<int64_t>();
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseDeepseekV3(const Fields& f, ModelConfig* c) {
  ASSIGN_OR_RETURN(std::optional<std::string> act, f.OptString("hidden_act"));
  if (act && *act != "silu") {
    return f.Error("hidden_act", absl::StrCat("is '", *act, "'; only 'silu' is supported"));
  }
  ASSIGN_OR_RETURN(c->vocab_size, f.Positive("vocab_size", std::nullopt));
  ASSIGN_OR_RETURN(c->hidden_size, f.Positive("hidden_size", std::nullopt));
  ASSIGN_OR_RETURN(c->num_layers, IntField(f, "num_hidden_layers", 1));
  ASSIGN_OR_RETURN(c->num_attention_heads, IntField(f, "num_attention_heads", 1));
  ASSIGN_OR_RETURN(c->num_key_value_heads,
                   IntField(f, "num_key_value_heads", 1, c->num_attention_heads));
  if (c->num_key_value_heads != c->num_attention_heads) {
    return f.Error("num_key_value_heads",
                   absl::StrCat("(", c->num_key_value_heads, ") must equal num_attention_heads (",
                                c->num_attention_heads, "): MLA expands a key and a value per head"));
  }

  // Multi-head latent attention.
  MlaConfig& mla = c->mla;
  if (!f.Contains("q_lora_rank")) {
    return f.Error("q_lora_rank", absl::StrCat("is required for ", kArchitecture,
                                               " (an integer, or null for q_proj without LoRA)"));
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> q_lora_rank, f.OptInt("q_lora_rank"));
  if (q_lora_rank) {
    if (*q_lora_rank < 1 || *q_lora_rank > std::numeric_limits<int>::max()) {
      return f.Error("q_lora_rank",
                     absl::StrCat("must be a positive integer or null (no LoRA), got ", *q_lora_rank,
                                  *q_lora_rank == 0 ? " (transformers builds a rank-0 q_a_proj for 0; "
                                                      "write null)"
                                                    : ""));
    }
    mla.q_lora_rank = static_cast<int>(*q_lora_rank);
  }
  ASSIGN_OR_RETURN(mla.kv_lora_rank, IntField(f, "kv_lora_rank", 1));
  ASSIGN_OR_RETURN(mla.qk_nope_head_dim, IntField(f, "qk_nope_head_dim", 1));
  ASSIGN_OR_RETURN(mla.qk_rope_head_dim, IntField(f, "qk_rope_head_dim", 1));
  ASSIGN_OR_RETURN(mla.v_head_dim, IntField(f, "v_head_dim", 1));
  if (mla.qk_rope_head_dim % 2 != 0) {
    return f.Error("qk_rope_head_dim",
                   absl::StrCat("must be even for rotary embeddings, got ", mla.qk_rope_head_dim));
  }
  ASSIGN_OR_RETURN(mla.rope_interleave, f.Bool("rope_interleave", true));
  c->head_dim = mla.qk_rope_head_dim;  // DeepseekV3Config.head_dim: what RoPE rotates
  ASSIGN_OR_RETURN(c->rms_norm_eps, f.PositiveFloat("rms_norm_eps", 1e-6f));
  ASSIGN_OR_RETURN(const bool bias, f.Bool("attention_bias", false));
  if (bias) return f.Error("attention_bias", "is true; DeepSeek-V3 has no projection biases");
  if (const json* v = f.Find("partial_rotary_factor")) {
    if (!v->is_number() || v->get<double>() != 1.0) {
      return f.Error("partial_rotary_factor", absl::StrCat("is ", v->dump(), "; only 1 is supported"));
    }
  }
  ASSIGN_OR_RETURN(c->tie_word_embeddings, f.Bool("tie_word_embeddings", false));
  ASSIGN_OR_RETURN(c->num_nextn_predict_layers, IntField(f, "num_nextn_predict_layers", 0, 0));

  // Experts: noaux_tc routing over groups, shared experts, dense first layers.
  ASSIGN_OR_RETURN(c->num_experts, IntField(f, "n_routed_experts", 1));
  ASSIGN_OR_RETURN(c->num_experts_per_tok, IntField(f, "num_experts_per_tok", 1));
  ASSIGN_OR_RETURN(c->n_group, IntField(f, "n_group", 1));
  ASSIGN_OR_RETURN(c->topk_group, IntField(f, "topk_group", 1));
  ASSIGN_OR_RETURN(const int shared, IntField(f, "n_shared_experts", 0));
  ASSIGN_OR_RETURN(c->moe_intermediate_size, f.Positive("moe_intermediate_size", std::nullopt));
  ASSIGN_OR_RETURN(c->first_k_dense_replace, IntField(f, "first_k_dense_replace", 0));
  if (!f.Has("routed_scaling_factor")) {
    return f.Error("routed_scaling_factor", absl::StrCat("is required for ", kArchitecture));
  }
  ASSIGN_OR_RETURN(c->routed_scaling_factor, f.PositiveFloat("routed_scaling_factor", 1.0f));
  ASSIGN_OR_RETURN(c->norm_topk_prob, f.Bool("norm_topk_prob", true));
  RETURN_IF_ERROR(OnlyString(f, "scoring_func", "sigmoid", "DeepSeek-V3 routes with sigmoid scores"));
  RETURN_IF_ERROR(OnlyString(f, "topk_method", "noaux_tc", "DeepSeek-V3's bias-corrected group routing"));
  if (c->num_experts % c->n_group != 0) {
    return f.Error("n_group", absl::StrCat("(", c->n_group, ") must divide n_routed_experts (",
                                           c->num_experts, ")"));
  }
  const int per_group = c->num_experts / c->n_group;
  if (per_group < 2) {
    return f.Error("n_group", absl::StrCat("(", c->n_group, ") leaves ", per_group,
                                           " expert per group; a group scores its top 2"));
  }
  if (c->topk_group > c->n_group) {
    return f.Error("topk_group", absl::StrCat("(", c->topk_group, ") exceeds n_group (", c->n_group, ")"));
  }
  if (c->num_experts_per_tok > c->topk_group * per_group) {
    return f.Error("num_experts_per_tok",
                   absl::StrCat("(", c->num_experts_per_tok, ") exceeds the ", c->topk_group * per_group,
                                " experts of the topk_group chosen groups"));
  }
  // DeepSeek's own code makes layer i MoE iff i >= first_k_dense_replace and
  // i % moe_layer_freq == 0; transformers ignores the key. Only 1 means the same in both.
  ASSIGN_OR_RETURN(const int freq, IntField(f, "moe_layer_freq", 1, 1));
  if (freq != 1) {
    return f.Error("moe_layer_freq", absl::StrCat("is ", freq, "; only 1 is supported "
                                                  "(transformers ignores the key)"));
  }
  c->router = RouterKind::kNoauxTc;
  c->decoder_sparse_step = 1;
  c->shared_expert_intermediate_size = c->moe_intermediate_size * shared;
  c->shared_expert_gated = false;
  if (c->first_k_dense_replace > 0) {
    ASSIGN_OR_RETURN(c->intermediate_size, f.Positive("intermediate_size", std::nullopt));
  } else {
    ASSIGN_OR_RETURN(std::optional<int64_t> inter, f.OptInt("intermediate_size"));
    c->intermediate_size = inter.value_or(0);
  }

  ASSIGN_OR_RETURN(c->max_position_embeddings, f.Positive("max_position_embeddings", 4096));
  RETURN_IF_ERROR(ParseRope(f, c));
  return ParseQuantization(f, c);
}

}  // namespace joule::config_internal
