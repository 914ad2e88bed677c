// Parameters of the normalization, activation and rotary-embedding kernels
// (F32), shared by the launches in kernels/cpu/elementwise.h and
// kernels/cuda/elementwise.h.
//
// Pointers are host memory for kernels::cpu launches and device memory for
// kernels::cuda launches. Device-neutral: no CUDA or thread-pool types here.
#pragma once

#include <cstdint>

#include "kernels/params/types.h"

namespace joule::kernels {

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight. out may alias x.
struct RmsNormParams {
  const float* x = nullptr;       // [rows, stride]
  const float* weight = nullptr;  // [cols]
  float* out = nullptr;           // [rows, stride]
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
  // Elements from one row of x (and of out) to the next; 0 means cols. MLA
  // normalizes the latent part of rows that also hold the rope key.
  int64_t stride = 0;
};

// out[i] = silu(gate[i]) * up[i] over n elements; out may alias gate or up.
struct SiluMulParams {
  const float* gate = nullptr;
  const float* up = nullptr;
  float* out = nullptr;
  int64_t n = 0;  // total elements
};

// Rotary embedding in the Hugging Face "rotate_half" (non-interleaved) form,
// applied in place to q [tokens, num_q_heads, head_dim] and k [tokens,
// num_kv_heads, head_dim] (either may be null). cos/sin tables are
// [max_position, head_dim / 2], built on the host with
// kernels::cpu::BuildRopeTable (and copied once to the device for CUDA).
//
// Multi-head latent attention rotates only part of each head: q_head_stride
// spaces q's heads (each head's rotated part at q + h * stride), q_out (when
// set, not overlapping q) receives the rotated q instead of q itself, its heads
// q_out_head_stride apart (tokens: num_q_heads times the head stride apart,
// in q and in q_out), k_row_stride spaces k's tokens, and `interleaved` rotates the pairs
// (x0, x1), (x2, x3), ... by the table's angles 0, 1, ... (DeepSeek-V3's
// rope_interleave). That is the rotate_half form of the pairs reordered into
// halves, up to the same permutation of q's and k's elements, which leaves
// their dot products unchanged.
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
  int64_t q_head_stride = 0;  // 0 means head_dim
  float* q_out = nullptr;          // [tokens, num_q_heads, q_out_head_stride]; null: q in place
  int64_t q_out_head_stride = 0;   // 0 means head_dim
  int64_t k_row_stride = 0;   // 0 means num_kv_heads * head_dim
  bool interleaved = false;
};

// out[t, :] = table[tokens[t], :] widened to F32 (the embedding lookup).
// Ids are checked by the caller (the model validates its batch).
struct EmbeddingParams {
  const int32_t* tokens = nullptr;  // [count]
  int64_t count = 0;
  const void* table = nullptr;      // [vocab, hidden] of table_type
  DType table_type = DType::kBF16;
  int64_t hidden = 0;
  float* out = nullptr;             // [count, hidden]
};

// y[i] += x[i] over n elements (a residual add).
struct AddParams {
  float* y = nullptr;
  const float* x = nullptr;
  int64_t n = 0;
};

// y[r, :] += sigmoid(gate_logit[r]) * x[r, :] (Qwen2-MoE's shared-expert gate).
struct GatedAddParams {
  float* y = nullptr;                 // [rows, cols]
  const float* x = nullptr;           // [rows, cols]
  const float* gate_logit = nullptr;  // [rows]
  int64_t rows = 0;
  int64_t cols = 0;
};

}  // namespace joule::kernels
