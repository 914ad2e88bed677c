// Dense and grouped GEMM with BF16, F32 or block-scaled FP8 (E4M3) weights and
// F32 activations (the grouped GEMM also takes BF16 activations, gathered in
// place).
//
// GemmParams and WeightType (layout and semantics) are in kernels/params/gemm.h,
// shared with the CUDA kernel. BF16 and FP8 weights are read straight from the
// mmapped checkpoint and widened in registers (FP8 times its block's scale);
// accumulation is F32.
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"
#include "kernels/params/gemm.h"
#include "kernels/params/moe.h"

namespace joule::kernels::cpu {

using ::joule::kernels::GemmParams;
using ::joule::kernels::GroupedGemmParams;
using ::joule::kernels::RowType;
using ::joule::kernels::WeightBlocks;
using ::joule::kernels::WeightType;

void LaunchGemm(const GemmParams& p, CpuStream stream);

// GroupedGemmParams: kernels/params/gemm.h. Work is split over (group,
// column block) pairs so uneven groups keep every core busy.
void LaunchGroupedGemm(const GroupedGemmParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
