#include "worker/engine/kv_cache.h"

#include <set>

#include "gtest/gtest.h"

namespace joule {
namespace {

TEST(BlockAllocatorTest, HandsOutEachBlockOnceAndTakesThemBack) {
  BlockAllocator a(5);
  std::set<int32_t> got;
  for (int i = 0; i < 5; ++i) got.insert(a.Allocate());
  EXPECT_EQ(got.size(), 5u);
  EXPECT_EQ(*got.begin(), 0);
  EXPECT_EQ(*got.rbegin(), 4);
  EXPECT_EQ(a.Allocate(), -1);
  EXPECT_EQ(a.num_free(), 0);
  a.Free(3);
  a.Free(3);  // double free is ignored
  a.Free(99); // unknown block is ignored
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_EQ(a.Allocate(), 3);
}

TEST(PagedKvCacheTest, SizesFromByteBudget) {
  ModelConfig c;
  c.num_layers = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  // One block: 2 (K,V) * 2 layers * 4 slots * 2 heads * 8 dims * 4 bytes = 1024 bytes.
  auto kv = PagedKvCache::Create(c, 4, 10 * 1024 + 100);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ((*kv)->BytesPerBlock(), 1024);
  EXPECT_EQ((*kv)->allocator().num_blocks(), 10);
  EXPECT_EQ((*kv)->view().k.size(), 2u);
  EXPECT_DOUBLE_EQ((*kv)->Usage(), 0.0);
  (*kv)->allocator().Allocate();
  EXPECT_DOUBLE_EQ((*kv)->Usage(), 0.1);
}

TEST(PagedKvCacheTest, RejectsBudgetBelowOneBlock) {
  ModelConfig c;
  c.num_layers = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  auto kv = PagedKvCache::Create(c, 4, 1000);
  EXPECT_EQ(kv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PagedKvCache::Create(c, 0, 1 << 20).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace joule
