// Parameters of the dense GEMM with BF16 or F32 weights and F32 activations,
// shared by kernels::cpu::LaunchGemm and kernels::cuda::LaunchGemm.
//
// Weights use PyTorch's nn.Linear layout: W is [n, k] row-major and
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]). BF16 weights are read as stored
// (on the CPU straight from the mmapped checkpoint) and widened in registers;
// accumulation is F32, so the two backends agree up to summation order.
//
// Pointers are host memory for kernels::cpu launches and device memory for
// kernels::cuda launches. Device-neutral: no CUDA or thread-pool types here.
#pragma once

#include <cstdint>

namespace joule::kernels {

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

}  // namespace joule::kernels
