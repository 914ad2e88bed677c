// A checkpoint's config.json (worker/model/config.h: ParseModelConfig) on any
// bytes. A config it accepts must hold what the model and the engine assume
// without checking again: positive sizes, heads that divide, an even head_dim,
// top-k within the experts, in-range dense layers, finite positive constants.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "tests/fuzz/fuzz_check.h"
#include "worker/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(joule::fuzz::Text(data, size));
  absl::StatusOr<joule::ModelConfig> parsed = joule::ParseModelConfig(text, "fuzz/config.json");
  if (!parsed.ok()) {
    FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument && !parsed.status().message().empty(),
               "%s", parsed.status().ToString().c_str());
    return 0;
  }
  const joule::ModelConfig& c = *parsed;
  FUZZ_CHECK(c.vocab_size > 0 && c.hidden_size > 0 && c.num_layers > 0, "non-positive size");
  FUZZ_CHECK(c.num_attention_heads > 0 && c.num_key_value_heads > 0, "non-positive head count");
  FUZZ_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, "kv heads do not divide heads");
  FUZZ_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "head_dim %d", c.head_dim);
  FUZZ_CHECK(c.num_experts > 0 && c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.num_experts,
             "experts %d, top-k %d", c.num_experts, c.num_experts_per_tok);
  FUZZ_CHECK(c.moe_intermediate_size > 0 && c.max_position_embeddings > 0, "non-positive size");
  FUZZ_CHECK(c.decoder_sparse_step > 0, "decoder_sparse_step %d", c.decoder_sparse_step);
  FUZZ_CHECK(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0, "rms_norm_eps %g", c.rms_norm_eps);
  FUZZ_CHECK(std::isfinite(c.rope_theta) && c.rope_theta > 0, "rope_theta %g", c.rope_theta);
  FUZZ_CHECK(c.sliding_window >= 0, "sliding_window %d", c.sliding_window);
  for (int layer : c.mlp_only_layers) FUZZ_CHECK(layer >= 0 && layer < c.num_layers, "mlp_only_layers %d", layer);
  bool has_dense = false;
  for (int l = 0; l < c.num_layers && l < 4096; ++l) has_dense = has_dense || !c.IsMoeLayer(l);
  if (has_dense) FUZZ_CHECK(c.intermediate_size > 0, "dense layers without intermediate_size");
  if (c.family == joule::ModelFamily::kQwen2Moe) FUZZ_CHECK(c.shared_expert_intermediate_size > 0, "no shared expert");
  if (c.family == joule::ModelFamily::kDeepseekV3) {
    const joule::MlaConfig& m = c.mla;
    FUZZ_CHECK(m.q_lora_rank >= 0 && m.kv_lora_rank > 0 && m.qk_nope_head_dim > 0 &&
                   m.qk_rope_head_dim > 0 && m.qk_rope_head_dim % 2 == 0 && m.v_head_dim > 0,
               "MLA sizes");
    FUZZ_CHECK(c.num_key_value_heads == c.num_attention_heads, "MLA heads");
    FUZZ_CHECK(c.n_group > 0 && c.num_experts % c.n_group == 0 && c.num_experts / c.n_group >= 2 &&
                   c.topk_group > 0 && c.topk_group <= c.n_group &&
                   c.num_experts_per_tok <= c.topk_group * (c.num_experts / c.n_group),
               "noaux_tc groups");
    FUZZ_CHECK(std::isfinite(c.routed_scaling_factor) && c.routed_scaling_factor > 0, "routed_scaling_factor");
    FUZZ_CHECK(std::isfinite(m.softmax_scale) && m.softmax_scale > 0, "softmax_scale %g", m.softmax_scale);
    FUZZ_CHECK(std::isfinite(c.yarn.attention_factor) && c.yarn.attention_factor > 0, "yarn attention factor");
    FUZZ_CHECK(!c.fp8.enabled || (c.fp8.block_rows > 0 && c.fp8.block_cols > 0), "fp8 blocks");
  }
  FUZZ_CHECK(c.bos_token_id >= -1, "bos_token_id %lld", static_cast<long long>(c.bos_token_id));
  for (int64_t id : c.eos_token_ids) FUZZ_CHECK(id >= 0, "eos_token_id %lld", static_cast<long long>(id));
  return 0;
}
