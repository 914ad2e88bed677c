#include "kernels/cuda/attention_checks.h"

#include "absl/strings/str_cat.h"

namespace joule::kernels::cuda {
namespace {

absl::Status ValidateHeads(const PagedAttentionParams& p) {
  if (p.num_q_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PagedAttention: num_q_heads must be positive, got ", p.num_q_heads));
  }
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PagedAttention: num_kv_heads must divide num_q_heads (",
                                                   p.num_q_heads, "), got ", p.num_kv_heads));
  }
  if (p.head_dim <= 0 || p.head_dim > kMaxAttentionHeadDim ||
      p.head_dim % kAttentionHeadDimMultiple != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PagedAttention: head_dim must be a multiple of ",
                                                   kAttentionHeadDimMultiple, " in [",
                                                   kAttentionHeadDimMultiple, ", ",
                                                   kMaxAttentionHeadDim, "], got ", p.head_dim));
  }
  const int v_dim = ValueDim(p);
  if (p.v_head_dim < 0 || v_dim > p.head_dim || v_dim > kMaxAttentionValueDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PagedAttention: v_head_dim (0: head_dim) must be in [0, head_dim] and at most ",
        kMaxAttentionValueDim, ", got ", p.v_head_dim, " with head_dim ", p.head_dim));
  }
  return absl::OkStatus();
}

absl::Status ValidateLayout(const PagedAttentionParams& p) {
  const auto positive = [](const char* field, int64_t value) {
    return absl::InvalidArgumentError(
        absl::StrCat("PagedAttention: ", field, " must be positive, got ", value));
  };
  const auto non_negative = [](const char* field, int64_t value) {
    return absl::InvalidArgumentError(
        absl::StrCat("PagedAttention: ", field, " must be >= 0, got ", value));
  };
  if (p.num_seqs < 0) return non_negative("num_seqs", p.num_seqs);
  if (p.block_size <= 0) return positive("block_size", p.block_size);
  if (p.max_blocks_per_seq <= 0) return positive("max_blocks_per_seq", p.max_blocks_per_seq);
  if (p.sliding_window < 0) return non_negative("sliding_window", p.sliding_window);
  if (p.max_context_len < 0) return non_negative("max_context_len", p.max_context_len);
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateCacheType(const char* kernel, DType cache_type) {
  if (cache_type == DType::kF32 || cache_type == DType::kBF16) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(kernel, ": cache_type must be f32 or bf16, got ",
                                                 static_cast<int>(cache_type)));
}

absl::Status ValidatePagedAttention(const PagedAttentionParams& p) {
  if (absl::Status s = ValidateHeads(p); !s.ok()) return s;
  if (p.num_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PagedAttention: num_tokens must be >= 0, got ", p.num_tokens));
  }
  if (absl::Status s = ValidateCacheType("PagedAttention", p.cache_type); !s.ok()) return s;
  // An empty batch reads no cache: its block table may be 0 wide.
  if (p.num_tokens == 0) return absl::OkStatus();
  return ValidateLayout(p);
}

}  // namespace joule::kernels::cuda
