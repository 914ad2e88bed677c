// What the CUDA paged attention launch accepts, as plain C++ (no CUDA
// headers): LaunchPagedAttention checks its parameters with it, and the
// CPU-backed fake device (worker/device/fake_device_backend.h) refuses what
// the GPU would refuse, so CI finds such a call without a GPU. An idle
// expert-parallel rank's empty batch (no tokens, max_blocks_per_seq 0) is
// valid.
#pragma once

#include "absl/status/status.h"
#include "kernels/params/attention.h"

namespace joule::kernels::cuda {

// Shapes the attention kernel takes (CUDA-only limits): head_dim a multiple of
// kAttentionHeadDimMultiple up to kMaxAttentionHeadDim (DeepSeek-V3's latent
// 512 + rope key 64), v_head_dim at most head_dim and kMaxAttentionValueDim.
// One CTA serves at most kMaxAttentionGroup query heads of a KV head; a wider
// group (multi-head latent attention: up to 128 heads on one KV head) runs in
// chunks of query heads, each of which reads the keys again.
inline constexpr int kAttentionHeadDimMultiple = 16;
inline constexpr int kMaxAttentionHeadDim = 576;
inline constexpr int kMaxAttentionValueDim = 512;
inline constexpr int kMaxAttentionGroup = 16;

// Width of a value row, and of an output row (v_head_dim 0: head_dim).
inline int ValueDim(const PagedAttentionParams& p) {
  return p.v_head_dim > 0 ? p.v_head_dim : p.head_dim;
}

// f32 or bf16; `kernel` names the launch in the message.
absl::Status ValidateCacheType(const char* kernel, DType cache_type);

// The heads, the cache type and, when there are tokens, the KV cache layout
// (block size, block table width, window, context bound). Pointers and the
// workspace are the launch's own checks.
absl::Status ValidatePagedAttention(const PagedAttentionParams& p);

}  // namespace joule::kernels::cuda
