// Mixture-of-experts routing kernels on CUDA: router top-k, the dispatch
// layout (slots grouped by expert), permute and the weighted un-permute.
// Same parameter structs and semantics as kernels/cpu/moe.h; every pointer is
// device memory. Launches are asynchronous on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace joule::kernels::cuda {

// Softmax over all experts (F32), then the top_k largest (ties: lower expert id
// first), optionally renormalized to sum to 1. Outputs are ordered by
// decreasing weight. num_experts is at most kMaxRouterExperts.
inline constexpr int kMaxRouterExperts = 1024;
struct RouterTopKParams {
  const float* logits = nullptr;  // [tokens, num_experts]
  int64_t tokens = 0;
  int num_experts = 0;
  int top_k = 0;
  bool renormalize = false;
  int32_t* expert_ids = nullptr;  // [tokens, top_k]
  float* weights = nullptr;       // [tokens, top_k]
};
absl::Status LaunchRouterTopK(const RouterTopKParams& p, cudaStream_t stream);

// Groups the tokens*top_k (token, choice) slots by expert, stable in slot order.
// expert_offsets[e]..expert_offsets[e+1] are expert e's rows in permuted order;
// permuted_to_slot[r] is the slot (token * top_k + choice) of permuted row r and
// slot_to_permuted is its inverse. Slots whose expert id is outside
// [0, num_experts) are left out (their slot_to_permuted entry is -1).
struct MoeLayoutParams {
  const int32_t* expert_ids = nullptr;  // [tokens * top_k]
  int64_t tokens = 0;
  int top_k = 0;
  int num_experts = 0;
  int64_t* expert_offsets = nullptr;    // [num_experts + 1]
  int32_t* permuted_to_slot = nullptr;  // [tokens * top_k]
  int32_t* slot_to_permuted = nullptr;  // [tokens * top_k]
};
absl::Status ComputeMoeLayout(const MoeLayoutParams& p, cudaStream_t stream);

// out[r, :] = x[permuted_to_slot[r] / top_k, :] for r in [0, rows).
struct PermuteParams {
  const float* x = nullptr;  // [tokens, hidden]
  int64_t hidden = 0;
  int64_t rows = 0;
  const int32_t* permuted_to_slot = nullptr;
  int top_k = 0;
  float* out = nullptr;  // [rows, hidden]
};
absl::Status LaunchPermute(const PermuteParams& p, cudaStream_t stream);

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
  bool accumulate = false;
};
absl::Status LaunchUnpermute(const UnpermuteParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
