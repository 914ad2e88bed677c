// Dense GEMM with BF16 or F32 weights and F32 activations on CUDA.
//
// Same parameter struct and semantics as kernels/cpu/gemm.h: W is [n, k]
// row-major (nn.Linear), y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]); BF16
// weights are widened in registers and accumulation is F32, so results match
// the CPU kernel up to summation order. Every pointer is device memory.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace joule::kernels::cuda {

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

absl::Status LaunchGemm(const GemmParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
