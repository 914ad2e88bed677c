#include "coordinator/cluster/model_summary.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace joule::cluster {
namespace {

using json = nlohmann::json;

absl::Status FieldError(const std::string& source, absl::string_view field, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": field '", field, "' ", msg));
}

// A positive integer field; `fallback` names an alternative spelling (Mixtral).
absl::StatusOr<int64_t> PositiveInt(const json& j, const std::string& source, const char* field,
                                    const char* fallback = nullptr) {
  const char* used = field;
  auto it = j.find(field);
  if (it == j.end() && fallback != nullptr) {
    it = j.find(fallback);
    used = fallback;
  }
  if (it == j.end()) return FieldError(source, field, "is missing");
  if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
    return FieldError(source, used, absl::StrCat("must be a positive integer, got ", it->dump()));
  }
  return it->get<int64_t>();
}

// An integer field >= 0 that fits an int; absent: `fallback`, or an error when there is none.
absl::StatusOr<int> NonNegativeInt(const json& j, const std::string& source, const char* field,
                                   std::optional<int> fallback = std::nullopt) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return FieldError(source, field, "is missing");
  }
  if (!it->is_number_integer() || it->get<int64_t>() < 0 ||
      it->get<int64_t>() > std::numeric_limits<int>::max()) {
    return FieldError(source, field, absl::StrCat("must be a non-negative integer, got ", it->dump()));
  }
  return it->get<int>();
}

// DeepseekV3ForCausalLM, named by architectures[0] or by model_type.
bool IsDeepseekV3(const json& j, const std::string& architecture) {
  auto type = j.find("model_type");
  return architecture == "DeepseekV3ForCausalLM" ||
         (type != j.end() && type->is_string() && *type == "deepseek_v3");
}

absl::Status ParseEosTokenIds(const json& j, const std::string& source, ModelSummary* m) {
  auto it = j.find("eos_token_id");
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  const json ids = it->is_array() ? *it : json::array({*it});
  for (const json& e : ids) {
    if (!e.is_number_integer() || e.get<int64_t>() < 0) {
      return FieldError(source, "eos_token_id",
                        absl::StrCat("must be a non-negative integer or a list of them, got ",
                                     it->dump()));
    }
    m->eos_token_ids.push_back(e.get<int64_t>());
  }
  return absl::OkStatus();
}

// Hugging Face's rule (Qwen2/3-MoE): a layer is MoE unless listed in
// mlp_only_layers, and only every decoder_sparse_step-th layer is. Mixtral has
// neither field: every layer is MoE.
absl::Status ParseQwenMoeLayers(const json& j, const std::string& source, ModelSummary* m) {
  ASSIGN_OR_RETURN(const int64_t num_experts,
                   PositiveInt(j, source, "num_experts", "num_local_experts"));
  m->num_experts = static_cast<int>(num_experts);
  int sparse_step = 1;
  if (j.contains("decoder_sparse_step")) {
    ASSIGN_OR_RETURN(const int64_t step, PositiveInt(j, source, "decoder_sparse_step"));
    sparse_step = static_cast<int>(step);
  }
  std::vector<int> mlp_only;
  if (auto it = j.find("mlp_only_layers"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) return FieldError(source, "mlp_only_layers", "must be a list of integers");
    for (const json& e : *it) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= m->num_layers) {
        return FieldError(source, "mlp_only_layers",
                          absl::StrCat("entry ", e.dump(), " is not a layer in [0, ", m->num_layers,
                                       ")"));
      }
      mlp_only.push_back(e.get<int>());
    }
  }
  m->moe_layer.resize(m->num_layers);
  for (int l = 0; l < m->num_layers; ++l) {
    m->moe_layer[l] = std::find(mlp_only.begin(), mlp_only.end(), l) == mlp_only.end() &&
                      (l + 1) % sparse_step == 0;
  }
  return absl::OkStatus();
}

// DeepSeek-V3 names the routed experts n_routed_experts; the layers below
// first_k_dense_replace are dense. DeepSeek's own code makes layer l >=
// first_k_dense_replace MoE when l % moe_layer_freq == 0, transformers ignores
// moe_layer_freq; like the worker (ModelConfig::IsMoeLayer), only 1, where
// both agree, is accepted.
absl::Status ParseDeepseekV3MoeLayers(const json& j, const std::string& source, ModelSummary* m) {
  ASSIGN_OR_RETURN(const int64_t num_experts, PositiveInt(j, source, "n_routed_experts"));
  m->num_experts = static_cast<int>(num_experts);
  ASSIGN_OR_RETURN(const int first_dense, NonNegativeInt(j, source, "first_k_dense_replace"));
  ASSIGN_OR_RETURN(const int freq, NonNegativeInt(j, source, "moe_layer_freq", 1));
  if (freq != 1) {
    return FieldError(source, "moe_layer_freq",
                      absl::StrCat("is ", freq, "; only 1 is supported (transformers ignores the "
                                   "key, DeepSeek's code reads it; the worker refuses it too)"));
  }
  m->moe_layer.resize(m->num_layers);
  for (int l = 0; l < m->num_layers; ++l) m->moe_layer[l] = l >= first_dense;
  return absl::OkStatus();
}

}  // namespace

int ModelSummary::num_moe_layers() const {
  return static_cast<int>(std::count(moe_layer.begin(), moe_layer.end(), true));
}

absl::StatusOr<ModelSummary> ParseModelSummary(const std::string& json_text,
                                               const std::string& source) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  ModelSummary m;
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->empty() || !(*arch)[0].is_string()) {
    return FieldError(source, "architectures", "must be a non-empty list of strings");
  }
  m.architecture = (*arch)[0].get<std::string>();
  m.is_deepseek_v3 = IsDeepseekV3(j, m.architecture);
  ASSIGN_OR_RETURN(m.vocab_size, PositiveInt(j, source, "vocab_size"));
  ASSIGN_OR_RETURN(m.hidden_size, PositiveInt(j, source, "hidden_size"));
  ASSIGN_OR_RETURN(const int64_t layers, PositiveInt(j, source, "num_hidden_layers"));
  m.num_layers = static_cast<int>(layers);
  RETURN_IF_ERROR(m.is_deepseek_v3 ? ParseDeepseekV3MoeLayers(j, source, &m)
                                   : ParseQwenMoeLayers(j, source, &m));
  ASSIGN_OR_RETURN(const int64_t top_k, PositiveInt(j, source, "num_experts_per_tok"));
  m.top_k = static_cast<int>(top_k);
  ASSIGN_OR_RETURN(m.max_context, PositiveInt(j, source, "max_position_embeddings"));
  RETURN_IF_ERROR(ParseEosTokenIds(j, source, &m));
  return m;
}

absl::StatusOr<ModelSummary> ReadModelSummary(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  auto m = ParseModelSummary(text, path);
  if (!m.ok()) return m.status();
  std::filesystem::path dir(model_dir);
  if (!dir.has_filename()) dir = dir.parent_path();  // "models/x/" -> "models/x"
  m->name = dir.filename().string();
  return m;
}

}  // namespace joule::cluster
