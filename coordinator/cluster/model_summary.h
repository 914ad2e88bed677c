// What the coordinator needs to know about the served model, read from the
// checkpoint's config.json: enough to validate requests (vocabulary, context)
// and to compute expert placement (layers, which of them are MoE, experts).
// The engine's full parser lives with the worker (worker/model/config.h); this
// reader keeps the coordinator independent of it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace joule::cluster {

struct ModelSummary {
  std::string name;          // served model name: the checkpoint directory's base name
  std::string architecture;  // architectures[0], e.g. "Qwen3MoeForCausalLM"
  // DeepseekV3ForCausalLM (architectures[0], or model_type "deepseek_v3"): experts are
  // n_routed_experts, the first first_k_dense_replace layers dense; it has its own chat template.
  bool is_deepseek_v3 = false;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int num_layers = 0;
  int num_experts = 0;  // routed experts per MoE layer (num_experts, num_local_experts, n_routed_experts)
  int top_k = 0;
  int64_t max_context = 0;  // max_position_embeddings
  std::vector<bool> moe_layer;  // per decoder layer
  std::vector<int64_t> eos_token_ids;  // eos_token_id (one id or a list; may be absent)

  int num_moe_layers() const;
};

// Parses config.json text; `source` names the file in errors. Fields the
// coordinator relies on must be present and positive; errors name the field.
absl::StatusOr<ModelSummary> ParseModelSummary(const std::string& json_text,
                                               const std::string& source);
// Reads DIR/config.json.
absl::StatusOr<ModelSummary> ReadModelSummary(const std::string& model_dir);

}  // namespace joule::cluster
