// One step's buffers, planned once from the largest step (StepShape) and
// carved from one device allocation: the step's metadata (staged in host
// memory and copied in one transfer), the activations of a layer, and the
// caller-owned workspaces the backend's GEMM and attention ask for.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "worker/device/backend.h"
#include "worker/model/config.h"
#include "worker/model/forward_batch.h"

namespace joule {

// A step's metadata, laid out for the reserved shape.
struct StepMetadata {
  int32_t* tokens = nullptr;        // [tokens]
  int32_t* positions = nullptr;     // [tokens]
  int64_t* slots = nullptr;         // [tokens]
  int32_t* query_start = nullptr;   // [seqs + 1]
  int32_t* context_lens = nullptr;  // [seqs]
  int32_t* block_tables = nullptr;  // [seqs, blocks_per_seq of the staged step]
  int32_t* logit_rows = nullptr;    // [logit_rows]
  float* temperature = nullptr;     // [logit_rows] StepSampling's, -1 for the host's rows
  double* uniform = nullptr;        // [logit_rows]
  int64_t* valid_tokens = nullptr;  // [1]: the real tokens of a padded step
};

// Activations of one layer, F32 unless noted.
struct StepActivations {
  float* x = nullptr;              // [tokens, hidden] the residual stream
  float* h = nullptr;              // [tokens, hidden] normed
  float* q = nullptr;              // [tokens, q_heads * head_dim] (MLA: qk_head_dim)
  float* k = nullptr;              // [tokens, kv_heads * head_dim] (none with MLA)
  float* v = nullptr;
  float* attn = nullptr;           // [tokens, q_heads * head_dim] (MLA: v_head_dim)
  // Multi-head latent attention only (worker/model/mla.h):
  float* q_lora = nullptr;       // [tokens, q_lora_rank]
  float* kv_latent = nullptr;    // [tokens, kv_lora_rank + qk_rope_head_dim] the cache rows
  float* q_latent = nullptr;     // [tokens, q_heads, kv_lora_rank + qk_rope_head_dim]
  float* attn_latent = nullptr;  // [tokens, q_heads, kv_lora_rank]
  float* mlp_out = nullptr;        // [tokens, hidden]
  float* shared = nullptr;         // [tokens, hidden] the shared expert's output
  float* mlp_scratch = nullptr;    // [2, tokens, dense or shared intermediate]
  float* router_logits = nullptr;  // [tokens, experts]
  int32_t* topk_ids = nullptr;     // [tokens, top_k]
  float* topk_weights = nullptr;   // [tokens, top_k]
  float* gate_logit = nullptr;     // [tokens]
  float* final = nullptr;          // [logit_rows, hidden]
  float* logits = nullptr;         // [logit_rows, vocab] (device memory; null on the CPU)
  int32_t* tokens = nullptr;       // [logit_rows] the device sampler's picks
  void* gemm_workspace = nullptr;
  void* attention_workspace = nullptr;
};

class StepWorkspace {
 public:
  // Plans every buffer for steps up to `shape` and allocates them (the old
  // ones are released).
  absl::Status Allocate(device::Backend& backend, const ModelConfig& config,
                        const StepShape& shape);

  const StepShape& shape() const { return shape_; }
  size_t bytes() const { return device_.bytes() + staging_.bytes(); }
  const StepMetadata& metadata() const { return device_meta_; }
  const StepActivations& activations() const { return act_; }

  // Writes `batch` into the staging copy, laid out as `step` (its block
  // tables step.blocks_per_seq wide), and copies it to the device. A step
  // larger than the batch is padding (CUDA graphs' fixed sizes): one-token
  // sequences with no context and no KV slot, after the batch's own, and
  // valid_tokens tells the router which tokens are real. Rows `sampling` does
  // not give the device (all without it; padding) are the host's.
  absl::Status Stage(device::Backend& backend, const ForwardBatch& batch, const StepShape& step,
                     const StepSampling* sampling = nullptr);

 private:
  StepMetadata Carve(std::byte* base) const;

  StepShape shape_;
  device::Buffer device_;   // metadata, then activations and workspaces
  device::Buffer staging_;  // pinned host copy of the metadata (none on the CPU)
  size_t metadata_bytes_ = 0;
  // Offsets of the metadata arrays within either buffer.
  size_t tokens_ = 0, positions_ = 0, slots_ = 0, query_start_ = 0, context_lens_ = 0,
         block_tables_ = 0, logit_rows_ = 0, temperature_ = 0, uniform_ = 0, valid_tokens_ = 0;
  StepMetadata device_meta_, staging_meta_;
  StepActivations act_;
};

}  // namespace joule
