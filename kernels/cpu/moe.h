// Mixture-of-experts routing kernels: router top-k, the dispatch layout
// (tokens permuted by expert), permute and the weighted un-permute (combine),
// and the row gather/reduce that expert-parallel dispatch/combine packs with.
// The parameter structs (and their semantics) are in kernels/params/moe.h,
// shared with the CUDA kernels.
#pragma once

#include "kernels/cpu/thread_pool.h"
#include "kernels/params/moe.h"

namespace joule::kernels::cpu {

using ::joule::kernels::ExpertLoadParams;
using ::joule::kernels::GatherRowsParams;
using ::joule::kernels::MoeLayoutParams;
using ::joule::kernels::PermuteParams;
using ::joule::kernels::ReduceRowsParams;
using ::joule::kernels::RouterMethod;
using ::joule::kernels::RouterTopKParams;
using ::joule::kernels::RowType;
using ::joule::kernels::UnpermuteParams;

// Both RouterMethods.
void LaunchRouterTopK(const RouterTopKParams& p, CpuStream stream);

// Runs synchronously on the calling thread. Expert ids outside
// [0, num_experts) are an error of the caller (unchecked; the CUDA kernel
// instead leaves such slots out).
void ComputeMoeLayout(const MoeLayoutParams& p);

// Runs synchronously on the calling thread.
void AccumulateExpertLoad(const ExpertLoadParams& p);

void LaunchPermute(const PermuteParams& p, CpuStream stream);
void LaunchUnpermute(const UnpermuteParams& p, CpuStream stream);
void LaunchGatherRows(const GatherRowsParams& p, CpuStream stream);
void LaunchReduceRows(const ReduceRowsParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
