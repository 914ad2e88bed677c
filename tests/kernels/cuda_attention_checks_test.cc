// What the CUDA paged attention launch accepts (kernels/cuda/attention_checks.h),
// checked on every CI host: the launch and the fake device use these checks.
#include "kernels/cuda/attention_checks.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;

PagedAttentionParams Decode() {
  PagedAttentionParams p;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 64;
  p.block_size = 16;
  p.num_seqs = 2;
  p.max_blocks_per_seq = 3;
  p.num_tokens = 2;
  return p;
}

// An idle expert-parallel rank runs every layer over an empty batch to serve
// its experts: no tokens and a 0-wide block table (Engine::BuildBatch).
TEST(CudaAttentionChecks, AnEmptyBatchWithNoBlockTableIsValid) {
  PagedAttentionParams p = Decode();
  p.num_tokens = 0;
  p.num_seqs = 0;
  p.max_blocks_per_seq = 0;
  EXPECT_TRUE(ValidatePagedAttention(p).ok()) << ValidatePagedAttention(p);
}

TEST(CudaAttentionChecks, TokensNeedABlockTable) {
  PagedAttentionParams p = Decode();
  EXPECT_TRUE(ValidatePagedAttention(p).ok()) << ValidatePagedAttention(p);
  p.max_blocks_per_seq = 0;
  EXPECT_THAT(ValidatePagedAttention(p).message(), HasSubstr("max_blocks_per_seq must be positive"));
  p = Decode();
  p.block_size = 0;
  EXPECT_THAT(ValidatePagedAttention(p).message(), HasSubstr("block_size must be positive"));
}

// The heads and the cache type are the model's: wrong even with no tokens.
TEST(CudaAttentionChecks, HeadsAndCacheTypeAreCheckedEvenWithoutTokens) {
  PagedAttentionParams p = Decode();
  p.num_tokens = 0;
  p.head_dim = 40;  // not a multiple of 16
  EXPECT_THAT(ValidatePagedAttention(p).message(), HasSubstr("head_dim must be a multiple of 16"));
  p = Decode();
  p.num_tokens = 0;
  p.num_kv_heads = 3;
  EXPECT_THAT(ValidatePagedAttention(p).message(), HasSubstr("num_kv_heads must divide"));
  p = Decode();
  p.num_tokens = 0;
  p.cache_type = DType::kF8E4M3;
  EXPECT_THAT(ValidatePagedAttention(p).message(), HasSubstr("cache_type must be f32 or bf16"));
  p = Decode();
  p.num_tokens = -1;
  EXPECT_THAT(ValidatePagedAttention(p).message(), HasSubstr("num_tokens must be >= 0, got -1"));
}

}  // namespace
}  // namespace joule::kernels::cuda
