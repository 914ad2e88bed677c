// Mixture-of-experts routing kernels on CUDA: router top-k, the dispatch
// layout (slots grouped by expert), permute and the weighted un-permute.
// The parameter structs (and their semantics) are in kernels/params/moe.h,
// shared with kernels/cpu/moe.h; every pointer is device memory. Launches are
// asynchronous on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/params/moe.h"

namespace joule::kernels::cuda {

using ::joule::kernels::MoeLayoutParams;
using ::joule::kernels::PermuteParams;
using ::joule::kernels::RouterTopKParams;
using ::joule::kernels::UnpermuteParams;

// num_experts is at most kMaxRouterExperts (CUDA-only limit).
inline constexpr int kMaxRouterExperts = 1024;
absl::Status LaunchRouterTopK(const RouterTopKParams& p, cudaStream_t stream);

// Unlike the CPU version, slots whose expert id is outside [0, num_experts)
// are left out (their slot_to_permuted entry is -1).
absl::Status ComputeMoeLayout(const MoeLayoutParams& p, cudaStream_t stream);

absl::Status LaunchPermute(const PermuteParams& p, cudaStream_t stream);
absl::Status LaunchUnpermute(const UnpermuteParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
