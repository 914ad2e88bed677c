// The feed-forward half of a decoder layer, over the post-attention-normed
// hidden states: the dense SwiGLU MLP, or the MoE block: the router (softmax
// top-k, or DeepSeek-V3's noaux_tc), the routed experts through an
// ExpertExecutor (local or expert-parallel: both receive the router's expert
// ids and weights), and the shared expert(s), gated by
// sigmoid(shared_expert_gate(x)) (Qwen2-MoE) or not (DeepSeek-V3).
//
// Written against the execution seam, as the rest of the forward pass, and
// apart from Model so it can be tested on a layer's weights alone.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/params/moe.h"
#include "worker/device/backend.h"
#include "worker/model/config.h"
#include "worker/model/device_weights.h"
#include "worker/model/experts.h"

namespace joule {

// Caller-owned buffers in the backend's memory (StepActivations holds them).
struct FeedForwardBuffers {
  float* mlp_scratch = nullptr;    // [2, tokens, widest dense or shared intermediate]
  float* shared = nullptr;         // [tokens, hidden]
  float* router_logits = nullptr;  // [tokens, num_experts]
  int32_t* topk_ids = nullptr;     // [tokens, top_k]
  float* topk_weights = nullptr;   // [tokens, top_k]
  float* gate_logit = nullptr;     // [tokens]
  void* gemm_workspace = nullptr;  // Backend::GemmWorkspaceBytes(tokens, widest k)
  // A padded step (CUDA graphs): device memory holding the count of real
  // tokens, which alone are routed. Null: every token is real.
  const int64_t* valid_tokens = nullptr;
};

// The router launch of a MoE layer: `logits` [tokens, num_experts] into
// expert ids and weights [tokens, top_k], by the config's RouterKind.
kernels::RouterTopKParams RouterParams(const ModelConfig& c, const LayerView& layer,
                                       const float* logits, int64_t tokens, int32_t* expert_ids,
                                       float* weights, const int64_t* valid_tokens);

// out [tokens, hidden] = the layer's feed-forward block of h [tokens, hidden].
// A MoE layer calls experts.Run also with zero tokens (expert parallelism
// keeps its ranks in lockstep that way).
absl::Status RunFeedForward(device::Backend& backend, const ModelConfig& c, const LayerView& layer,
                            int layer_index, ExpertExecutor& experts, const float* h,
                            int64_t tokens, const FeedForwardBuffers& buffers, float* out);

}  // namespace joule
