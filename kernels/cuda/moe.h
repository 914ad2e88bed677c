// Mixture-of-experts routing kernels on CUDA: router top-k, the dispatch
// layout (slots grouped by expert), expert load counts, permute, the weighted
// un-permute and the row gather and reduce of expert-parallel dispatch/combine.
// The parameter structs (and their semantics) are in kernels/params/moe.h,
// shared with kernels/cpu/moe.h; every pointer is device memory. Launches are
// asynchronous on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/params/moe.h"

namespace joule::kernels::cuda {

using ::joule::kernels::ExpertLoadParams;
using ::joule::kernels::GatherRowsParams;
using ::joule::kernels::MoeLayoutParams;
using ::joule::kernels::PermuteParams;
using ::joule::kernels::ReduceRowsParams;
using ::joule::kernels::RouterMethod;
using ::joule::kernels::RouterTopKParams;
using ::joule::kernels::RowType;
using ::joule::kernels::UnpermuteParams;

// num_experts is at most kMaxRouterExperts (CUDA-only limit). valid_tokens,
// when set, is read on the device, so a captured graph replays any count.
inline constexpr int kMaxRouterExperts = 1024;
absl::Status LaunchRouterTopK(const RouterTopKParams& p, cudaStream_t stream);

// Unlike the CPU version, slots whose expert id is outside [0, num_experts)
// (router padding's -1 among them) are left out: their slot_to_permuted entry
// is -1, and permuted rows past expert_offsets[num_experts] (in
// permuted_to_slot and permuted_to_token) are not written.
absl::Status ComputeMoeLayout(const MoeLayoutParams& p, cudaStream_t stream);

// The CPU's AccumulateExpertLoad as a launch on `stream` (the offsets it
// reads are on the device).
absl::Status AccumulateExpertLoad(const ExpertLoadParams& p, cudaStream_t stream);

absl::Status LaunchPermute(const PermuteParams& p, cudaStream_t stream);
absl::Status LaunchUnpermute(const UnpermuteParams& p, cudaStream_t stream);

// copy_of is ignored: converting a row again gives the same bits as copying
// the earlier conversion, and one pass needs no ordering between rows.
// Strides and the in/out pointers must be multiples of their element size
// (checked); out_rows entries, which live on the device, must be too.
absl::Status LaunchGatherRows(const GatherRowsParams& p, cudaStream_t stream);

// Deterministic (one block per output row, no atomics) and, for finite
// values, bit for bit the CPU's sums: the same terms multiplied and added in
// the same order, without FMA contraction. Alignment is checked as for
// GatherRows; accumulate with BF16 out is refused (kernels::cpu ignores it).
absl::Status LaunchReduceRows(const ReduceRowsParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
