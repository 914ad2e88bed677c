// Parameters of the mixture-of-experts routing kernels: router top-k, the
// dispatch layout (tokens permuted by expert), permute and the weighted
// un-permute (combine). Shared by the launches in kernels/cpu/moe.h and
// kernels/cuda/moe.h; backend-specific limits and edge cases are documented
// next to each launch there.
//
// Pointers are host memory for kernels::cpu launches and device memory for
// kernels::cuda launches. Device-neutral: no CUDA or thread-pool types here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/params/types.h"

namespace joule::kernels {

// How a router turns its logits into top_k experts and weights.
enum class RouterMethod : uint8_t {
  // Softmax over all experts (F32), then the top_k largest (ties: lower
  // expert id first), optionally renormalized to sum to 1 (Qwen's
  // norm_topk_prob, Mixtral always). Ordered by decreasing weight.
  kSoftmaxTopK,
  // DeepSeek-V3's noaux_tc: scores = sigmoid(logits) (F32); the choice uses
  // scores + selection_bias: each of num_groups contiguous groups of experts
  // scores the sum of its 2 largest biased scores, the topk_groups best groups
  // are kept, and the top_k largest biased scores within them are chosen
  // (ties: lower group / expert id first). The weights are the chosen
  // experts' unbiased scores, divided by their sum (+1e-20) when renormalize,
  // times scaling (routed_scaling_factor). Ordered by decreasing biased score.
  // Experts outside the kept groups are never chosen (DeepSeek's and vLLM's
  // -inf mask; transformers fills them with 0.0, which chooses the same
  // while the biased scores are positive).
  kNoauxTc,
};

struct RouterTopKParams {
  const float* logits = nullptr;  // [tokens, num_experts]
  int64_t tokens = 0;
  int num_experts = 0;
  int top_k = 0;
  bool renormalize = false;
  int32_t* expert_ids = nullptr;  // [tokens, top_k]
  float* weights = nullptr;       // [tokens, top_k]
  // Optional, device memory (CUDA graphs pad a batch to a captured size):
  // tokens at or past *valid_tokens are padding and get expert id -1 and
  // weight 0, so the layout leaves them out. Null: every token is real.
  const int64_t* valid_tokens = nullptr;
  RouterMethod method = RouterMethod::kSoftmaxTopK;
  // kNoauxTc only:
  const float* selection_bias = nullptr;  // [num_experts] e_score_correction_bias
  int num_groups = 1;                     // n_group; divides num_experts, >= 2 experts each
  int topk_groups = 1;                    // topk_group
  float scaling = 1.0f;                   // routed_scaling_factor
};

// Groups the tokens*top_k (token, choice) slots by expert, stable in slot order.
// expert_offsets[e]..expert_offsets[e+1] are expert e's rows in permuted order;
// permuted_to_slot[r] is the slot (token * top_k + choice) of permuted row r and
// slot_to_permuted is its inverse. What happens to expert ids outside
// [0, num_experts) differs by backend; see ComputeMoeLayout in each.
struct MoeLayoutParams {
  const int32_t* expert_ids = nullptr;  // [tokens * top_k]
  int64_t tokens = 0;
  int top_k = 0;
  int num_experts = 0;
  int64_t* expert_offsets = nullptr;    // [num_experts + 1]
  int32_t* permuted_to_slot = nullptr;  // [tokens * top_k]
  int32_t* slot_to_permuted = nullptr;  // [tokens * top_k]
  // Optional [tokens * top_k]: the token of each permuted row
  // (permuted_to_slot / top_k), the row index the expert GEMMs read x by.
  int32_t* permuted_to_token = nullptr;
};

// load[e] += expert_offsets[e + 1] - expert_offsets[e] for every expert: the
// per-expert token counts that EPLB reads, kept where the layout is.
struct ExpertLoadParams {
  const int64_t* expert_offsets = nullptr;  // [num_experts + 1]
  int num_experts = 0;
  int64_t* load = nullptr;                  // [num_experts]
};

// out[r, :] = x[permuted_to_slot[r] / top_k, :] for r in [0, rows).
struct PermuteParams {
  const float* x = nullptr;  // [tokens, hidden]
  int64_t hidden = 0;
  int64_t rows = 0;
  const int32_t* permuted_to_slot = nullptr;
  int top_k = 0;
  float* out = nullptr;  // [rows, hidden]
};

// out[t, :] (+)= sum_j weights[t*top_k + j] * expert_out[slot_to_permuted[t*top_k + j], :],
// summed in choice order j = 0..top_k-1.
struct UnpermuteParams {
  const float* expert_out = nullptr;  // [tokens * top_k, hidden]
  const int32_t* slot_to_permuted = nullptr;
  const float* weights = nullptr;     // [tokens * top_k]
  int64_t tokens = 0;
  int top_k = 0;
  int64_t hidden = 0;
  float* out = nullptr;  // [tokens, hidden]
  bool accumulate = false;  // add into out instead of overwriting it
  // Set instead of expert_out when the expert outputs arrive as BF16 (an
  // expert-parallel combine with BF16 payloads): widened while summing.
  const uint16_t* expert_out_bf16 = nullptr;
};

// out row r = in row (index ? index[r] / index_divisor : r), converted from
// in_type to out_type (F32 -> BF16 rounds to nearest even, NaN stays NaN).
// Rows are `hidden` elements at the given byte strides, so packed exchange
// rows may carry trailing bytes (an expert id) the kernel leaves alone.
// Expert-parallel dispatch/combine packs and unpacks its payloads with it.
// CPU and CUDA launches (the GPU model gathers its sampled rows with it).
struct GatherRowsParams {
  const void* in = nullptr;
  RowType in_type = RowType::kF32;
  int64_t in_stride_bytes = 0;
  const int32_t* index = nullptr;  // [rows], or null for the identity
  int index_divisor = 1;           // e.g. top_k, to map a slot to its token
  void* out = nullptr;
  RowType out_type = RowType::kF32;
  int64_t out_stride_bytes = 0;
  int64_t rows = 0;
  int64_t hidden = 0;
  // Optional [rows]: where out row r goes, in place of out + r *
  // out_stride_bytes (rows spread over several buffers, e.g. peers' windows).
  std::byte* const* out_rows = nullptr;
  // Optional [rows]: an earlier out row (< r) that holds the same input row,
  // or -1. Such rows are copied from it as converted instead of converted
  // again: a token dispatched to several ranks is rounded once. Same bits.
  const int64_t* copy_of = nullptr;
};

// out row r (+)= sum_j weights[j] * in row index[j] for j in [offsets[r],
// offsets[r+1]), summed in j order in F32, then written as out_type (F32 ->
// BF16 rounds to nearest even once, after the sum). Strides are bytes, as in
// GatherRowsParams. An expert-parallel combine reduces each token's expert
// outputs on the rank that ran them with it, and adds the partial sums of all
// ranks into the token's output. CPU and CUDA launches (the GPU's
// expert-parallel executor reduces on the device with it).
struct ReduceRowsParams {
  const void* in = nullptr;
  RowType in_type = RowType::kF32;
  int64_t in_stride_bytes = 0;
  const int64_t* offsets = nullptr;  // [rows + 1] terms of each output row
  const int32_t* index = nullptr;    // [offsets[rows]] input row of each term
  const float* weights = nullptr;    // [offsets[rows]], or null: every weight 1
  void* out = nullptr;
  RowType out_type = RowType::kF32;
  int64_t out_stride_bytes = 0;
  bool accumulate = false;  // F32 out only: add into out instead of overwriting it
  int64_t rows = 0;
  int64_t hidden = 0;
  // Optional [rows]: where out row r goes, in place of out + r *
  // out_stride_bytes (rows spread over several buffers, e.g. peers' windows).
  std::byte* const* out_rows = nullptr;
};

}  // namespace joule::kernels
