#include "worker/engine/kv_cache.h"

#include "gtest/gtest.h"
#include "worker/device/cpu_backend.h"

namespace joule {
namespace {

TEST(PagedKvCacheTest, SizesFromByteBudget) {
  device::CpuBackend cpu(1);
  ModelConfig c;
  c.num_layers = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  // One block: 2 (K,V) * 2 layers * 4 slots * 2 heads * 8 dims * 4 bytes = 1024 bytes
  // (F32 on the CPU; BF16 halves it on a GPU).
  EXPECT_EQ(PagedKvCache::BlockBytes(c, 4, kernels::DType::kBF16), 512);
  auto kv = PagedKvCache::Create(cpu, c, 4, 10 * 1024 + 100);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ((*kv)->BytesPerBlock(), 1024);
  EXPECT_EQ((*kv)->allocator().num_blocks(), 10);
  EXPECT_EQ((*kv)->view().k.size(), 2u);
  EXPECT_EQ((*kv)->view().type, kernels::DType::kF32);
  // The layers' K and V regions do not overlap: layer 1's K starts after layer 0's V.
  EXPECT_EQ(static_cast<std::byte*>((*kv)->view().k[1]) - static_cast<std::byte*>((*kv)->view().v[0]),
            2560);  // 10 blocks * 4 slots * 2 heads * 8 dims * 4 bytes
  EXPECT_DOUBLE_EQ((*kv)->Usage(), 0.0);
  (*kv)->allocator().Allocate();
  EXPECT_DOUBLE_EQ((*kv)->Usage(), 0.1);
}

// Multi-head latent attention caches one row per token and layer, the latent
// and the rope key (DeepSeek-V3: 512 + 64), and no V: against the expanded
// per-head keys and values (128 heads * (192 + 128)) that is 1/71.1 of the bytes.
TEST(PagedKvCacheTest, MlaCachesOneLatentRowPerTokenAndLayer) {
  device::CpuBackend cpu(1);
  ModelConfig c;
  c.family = ModelFamily::kDeepseekV3;
  c.num_layers = 3;
  c.num_attention_heads = c.num_key_value_heads = 128;
  c.mla = {.kv_lora_rank = 512, .qk_nope_head_dim = 128, .qk_rope_head_dim = 64, .v_head_dim = 128};
  c.head_dim = 64;
  EXPECT_EQ(PagedKvCache::BlockBytes(c, 16, kernels::DType::kBF16), 3 * 16 * 576 * 2);
  const int64_t expanded = int64_t{3} * 16 * 128 * (192 + 128) * 2;
  EXPECT_NEAR(static_cast<double>(expanded) / PagedKvCache::BlockBytes(c, 16, kernels::DType::kBF16),
              71.1, 0.05);
  auto kv = PagedKvCache::Create(cpu, c, 16, 5 * 3 * 16 * 576 * 4);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ((*kv)->allocator().num_blocks(), 5);
  ASSERT_EQ((*kv)->view().k.size(), 3u);
  ASSERT_EQ((*kv)->view().v.size(), 3u);
  for (int l = 0; l < 3; ++l) EXPECT_EQ((*kv)->view().v[l], nullptr);
  // Layers follow each other: 5 blocks * 16 slots * 576 floats.
  EXPECT_EQ(static_cast<std::byte*>((*kv)->view().k[2]) - static_cast<std::byte*>((*kv)->view().k[1]),
            5 * 16 * 576 * 4);
}

TEST(PagedKvCacheTest, RejectsBudgetBelowOneBlock) {
  device::CpuBackend cpu(1);
  ModelConfig c;
  c.num_layers = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  auto kv = PagedKvCache::Create(cpu, c, 4, 1000);
  EXPECT_EQ(kv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PagedKvCache::Create(cpu, c, 0, 1 << 20).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace joule
