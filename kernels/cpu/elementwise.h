// Normalization, activation and rotary-embedding kernels (F32).
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"

namespace joule::kernels::cpu {

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight. out may alias x.
struct RmsNormParams {
  const float* x = nullptr;       // [rows, cols]
  const float* weight = nullptr;  // [cols]
  float* out = nullptr;           // [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
};
void LaunchRmsNorm(const RmsNormParams& p, CpuStream stream);

// out[r, i] = silu(gate[r, i]) * up[r, i]; out may alias gate or up.
struct SiluMulParams {
  const float* gate = nullptr;
  const float* up = nullptr;
  float* out = nullptr;
  int64_t n = 0;  // total elements
};
void LaunchSiluMul(const SiluMulParams& p, CpuStream stream);

// Rotary embedding in the Hugging Face "rotate_half" (non-interleaved) form,
// applied in place to q [tokens, num_q_heads, head_dim] and k [tokens, num_kv_heads, head_dim].
// cos/sin tables are [max_position, head_dim / 2] (see BuildRopeTable).
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
void LaunchRope(const RopeParams& p, CpuStream stream);

// Fills cos/sin [max_position, head_dim/2] the way Hugging Face computes them
// in F32: inv_freq[i] = 1 / theta^(2i/head_dim), angle = position * inv_freq[i].
void BuildRopeTable(float theta, int head_dim, int64_t max_position, float* cos, float* sin);

}  // namespace joule::kernels::cpu
