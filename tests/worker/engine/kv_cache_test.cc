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
