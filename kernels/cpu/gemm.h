// Dense and grouped GEMM with BF16 or F32 weights and F32 activations (the
// grouped GEMM also takes BF16 activations, gathered in place).
//
// GemmParams and WeightType (layout and semantics) are in kernels/params/gemm.h,
// shared with the CUDA kernel. BF16 weights are read straight from the mmapped
// checkpoint and widened in registers; accumulation is F32.
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"
#include "kernels/params/gemm.h"
#include "kernels/params/moe.h"

namespace joule::kernels::cpu {

using ::joule::kernels::GemmParams;
using ::joule::kernels::RowType;
using ::joule::kernels::WeightType;

void LaunchGemm(const GemmParams& p, CpuStream stream);

// One GEMM per group over contiguous row ranges of x (tokens permuted by
// expert): rows [row_offsets[g], row_offsets[g+1]) are multiplied by w[g].
// Groups with no rows are skipped (their w may be null). Work is split over
// (group, column block) pairs so uneven groups keep every core busy.
struct GroupedGemmParams {
  int num_groups = 0;
  const void* x = nullptr;             // [total_rows, k] of x_type, row stride ldx
  const int64_t* row_offsets = nullptr;  // [num_groups + 1]
  int64_t k = 0;
  int64_t n = 0;
  const void* const* w = nullptr;      // [num_groups] pointers to [n, k]
  WeightType w_type = WeightType::kBF16;
  float* y = nullptr;                  // [total_rows, n], or with y_rows [max(y_rows) + 1, n]
  // Optional weighted scatter-add (an MoE combine fused into the down
  // projection): row r of the product is multiplied by row_scale[r] (when
  // given) and added into row y_rows[r] of y, which the caller initialized.
  // Several rows may name the same y row; each y row then receives its terms
  // in group order, whatever the thread count, so results are deterministic.
  const int32_t* y_rows = nullptr;     // [total_rows]
  const float* row_scale = nullptr;    // [total_rows]; only with y_rows
  // Activations: F32, or BF16 (widened exactly in registers, like weights).
  // Optional in-place gather: row r of the product reads row x_rows[r] of x,
  // so rows straight from a receive buffer, one row shared by several groups,
  // need no regrouped copy. ldx: elements between rows of x (0: k).
  RowType x_type = RowType::kF32;
  int64_t ldx = 0;
  const int32_t* x_rows = nullptr;     // [total_rows]
};

void LaunchGroupedGemm(const GroupedGemmParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
