// Normalization, activation and rotary-embedding kernels on CUDA (F32).
// Same parameter structs and semantics as kernels/cpu/elementwise.h; every
// pointer is device memory. Launches are asynchronous on `stream`; the Status
// reports bad parameters and launch failures, not faults inside the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace joule::kernels::cuda {

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight. out may alias x.
struct RmsNormParams {
  const float* x = nullptr;       // [rows, cols]
  const float* weight = nullptr;  // [cols]
  float* out = nullptr;           // [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
};
absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);

// out[i] = silu(gate[i]) * up[i]; out may alias gate or up.
struct SiluMulParams {
  const float* gate = nullptr;
  const float* up = nullptr;
  float* out = nullptr;
  int64_t n = 0;  // total elements
};
absl::Status LaunchSiluMul(const SiluMulParams& p, cudaStream_t stream);

// Rotary embedding in the Hugging Face "rotate_half" (non-interleaved) form,
// applied in place to q [tokens, num_q_heads, head_dim] and k [tokens,
// num_kv_heads, head_dim] (either may be null). cos/sin are [max_position,
// head_dim / 2] device tables, built on the host with
// kernels::cpu::BuildRopeTable and copied once.
struct RopeParams {
  float* q = nullptr;
  float* k = nullptr;
  const int32_t* positions = nullptr;  // [tokens]
  int64_t tokens = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
};
absl::Status LaunchRope(const RopeParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
