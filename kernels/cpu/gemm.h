// Dense and grouped GEMM with BF16 or F32 weights and F32 activations.
//
// Weights use PyTorch's nn.Linear layout: W is [n, k] row-major and
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]). BF16 weights are read straight
// from the mmapped checkpoint and widened in registers; accumulation is F32.
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"

namespace joule::kernels::cpu {

enum class WeightType { kF32, kBF16 };

struct GemmParams {
  const float* x = nullptr;  // [m, ldx]
  int64_t m = 0;
  int64_t k = 0;
  int64_t ldx = 0;           // 0 means k
  const void* w = nullptr;   // [n, k], dense rows
  WeightType w_type = WeightType::kBF16;
  int64_t n = 0;
  const float* bias = nullptr;  // optional [n]
  float* y = nullptr;           // [m, ldy]
  int64_t ldy = 0;              // 0 means n
  bool accumulate = false;      // y += x W^T instead of y = x W^T
};

void LaunchGemm(const GemmParams& p, CpuStream stream);

// One GEMM per group over contiguous row ranges of x (tokens permuted by
// expert): rows [row_offsets[g], row_offsets[g+1]) are multiplied by w[g].
// Groups with no rows are skipped (their w may be null). Work is split over
// (group, column block) pairs so uneven groups keep every core busy.
struct GroupedGemmParams {
  int num_groups = 0;
  const float* x = nullptr;            // [total_rows, k]
  const int64_t* row_offsets = nullptr;  // [num_groups + 1]
  int64_t k = 0;
  int64_t n = 0;
  const void* const* w = nullptr;      // [num_groups] pointers to [n, k]
  WeightType w_type = WeightType::kBF16;
  float* y = nullptr;                  // [total_rows, n]
};

void LaunchGroupedGemm(const GroupedGemmParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
