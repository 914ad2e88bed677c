#include "worker/model/feed_forward.h"

#include "common/status.h"

namespace joule {

kernels::RouterTopKParams RouterParams(const ModelConfig& c, const LayerView& layer,
                                       const float* logits, int64_t tokens, int32_t* expert_ids,
                                       float* weights, const int64_t* valid_tokens) {
  kernels::RouterTopKParams p{.logits = logits, .tokens = tokens, .num_experts = c.num_experts,
                              .top_k = c.num_experts_per_tok, .renormalize = c.norm_topk_prob,
                              .expert_ids = expert_ids, .weights = weights,
                              .valid_tokens = valid_tokens};
  if (c.router == RouterKind::kNoauxTc) {
    p.method = kernels::RouterMethod::kNoauxTc;
    p.selection_bias = layer.router_bias;
    p.num_groups = c.n_group;
    p.topk_groups = c.topk_group;
    p.scaling = c.routed_scaling_factor;
  }
  return p;
}

absl::Status RunFeedForward(device::Backend& backend, const ModelConfig& c, const LayerView& L,
                            int layer_index, ExpertExecutor& experts, const float* h,
                            int64_t tokens, const FeedForwardBuffers& b, float* out) {
  if (!L.is_moe) return RunMlp(backend, L.dense, h, tokens, out, b.mlp_scratch, b.gemm_workspace);
  const int64_t H = c.hidden_size;
  if (tokens > 0) {
    RETURN_IF_ERROR(backend.Gemm(LinearGemm(L.router, h, tokens, b.router_logits, b.gemm_workspace)));
    RETURN_IF_ERROR(backend.RouterTopK(RouterParams(c, L, b.router_logits, tokens, b.topk_ids,
                                                    b.topk_weights, b.valid_tokens)));
  }
  // The executor adds into out, which starts at zero.
  RETURN_IF_ERROR(backend.Zero(out, static_cast<size_t>(tokens * H) * sizeof(float)));
  RETURN_IF_ERROR(Annotate(experts.Run(layer_index, h, tokens, b.topk_ids, b.topk_weights, out),
                           "experts"));
  if (!L.has_shared_expert) return absl::OkStatus();
  RETURN_IF_ERROR(RunMlp(backend, L.shared_expert, h, tokens, b.shared, b.mlp_scratch, b.gemm_workspace));
  if (L.shared_expert_gate.w == nullptr) {
    // DeepSeek-V3: out += shared_experts(x).
    return backend.Add({.y = out, .x = b.shared, .n = tokens * H});
  }
  // Qwen2-MoE: out += sigmoid(x . w_gate) * shared_expert(x).
  RETURN_IF_ERROR(backend.Gemm(LinearGemm(L.shared_expert_gate, h, tokens, b.gate_logit,
                                          b.gemm_workspace)));
  return backend.GatedAdd({.y = out, .x = b.shared, .gate_logit = b.gate_logit, .rows = tokens,
                           .cols = H});
}

}  // namespace joule
