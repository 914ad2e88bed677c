// The block manager's bookkeeping: reference counts, published blocks that
// outlive their holders, least-recently-released eviction that never takes a
// held block, and names that depend on the whole prefix.
#include "worker/engine/block_allocator.h"

#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace joule {
namespace {

std::vector<int32_t> Tokens(int salt) { return {salt, salt + 1, salt + 2, salt + 3}; }

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

TEST(BlockAllocatorTest, APublishedBlockIsSharedAndOutlivesItsHolders) {
  BlockAllocator a(4, /*prefix_caching=*/true);
  const BlockHash h = HashBlock(kRootBlockHash, Tokens(1));
  const int32_t b = a.Allocate();
  EXPECT_EQ(a.Find(h, Tokens(1)), -1);  // not computed yet
  ASSERT_TRUE(a.Publish(b, h, Tokens(1)));
  EXPECT_EQ(a.Find(h, Tokens(1)), b);
  a.Share(b);
  EXPECT_EQ(a.ref_count(b), 2);
  a.Free(b);
  a.Free(b);
  EXPECT_EQ(a.ref_count(b), 0);
  // Unheld but cached: counts as free, still found.
  EXPECT_EQ(a.num_free(), 4);
  EXPECT_EQ(a.num_cached(), 1);
  EXPECT_EQ(a.Find(h, Tokens(1)), b);
  a.Share(b);  // taken back from the evictable list
  EXPECT_EQ(a.num_free(), 3);
  for (int i = 0; i < 3; ++i) EXPECT_NE(a.Allocate(), b);
  EXPECT_EQ(a.Allocate(), -1);  // a held block is never evicted
}

TEST(BlockAllocatorTest, EvictsTheLeastRecentlyReleasedUnheldBlockOnlyWhenNothingIsFree) {
  BlockAllocator a(4, /*prefix_caching=*/true);
  std::vector<int32_t> blocks;
  for (int i = 0; i < 3; ++i) {
    blocks.push_back(a.Allocate());
    ASSERT_TRUE(a.Publish(blocks[i], HashBlock(kRootBlockHash, Tokens(10 * i)), Tokens(10 * i)));
  }
  // Released in the order 1, 0; block 2 stays held.
  a.Free(blocks[1]);
  a.Free(blocks[0]);
  EXPECT_EQ(a.num_free(), 3);  // one never used + two cached
  const int32_t fresh = a.Allocate();
  EXPECT_EQ(a.num_cached(), 3);  // the never-used block went first
  EXPECT_NE(fresh, blocks[0]);
  EXPECT_NE(fresh, blocks[1]);
  EXPECT_EQ(a.Allocate(), blocks[1]);  // least recently released
  EXPECT_EQ(a.Find(HashBlock(kRootBlockHash, Tokens(10)), Tokens(10)), -1);  // forgotten
  EXPECT_EQ(a.Find(HashBlock(kRootBlockHash, Tokens(0)), Tokens(0)), blocks[0]);
  EXPECT_EQ(a.Allocate(), blocks[0]);
  EXPECT_EQ(a.Allocate(), -1);
  EXPECT_EQ(a.num_cached(), 1);  // the held one
  EXPECT_EQ(a.Find(HashBlock(kRootBlockHash, Tokens(20)), Tokens(20)), blocks[2]);
}

TEST(BlockAllocatorTest, TheSameTokensAfterAnotherPrefixAreAnotherBlock) {
  const BlockHash a = HashBlock(kRootBlockHash, Tokens(1));
  const BlockHash b = HashBlock(kRootBlockHash, Tokens(2));
  EXPECT_FALSE(a == b);
  EXPECT_FALSE(HashBlock(a, Tokens(5)) == HashBlock(b, Tokens(5)));
  EXPECT_TRUE(HashBlock(a, Tokens(5)) == HashBlock(HashBlock(kRootBlockHash, Tokens(1)), Tokens(5)));
  // Order within a block matters too.
  EXPECT_FALSE(HashBlock(kRootBlockHash, std::vector<int32_t>{1, 2}) ==
               HashBlock(kRootBlockHash, std::vector<int32_t>{2, 1}));
}

TEST(BlockAllocatorTest, AHashCollisionIsAMissNotSomeoneElsesBlock) {
  BlockAllocator a(2, /*prefix_caching=*/true);
  const BlockHash h = HashBlock(kRootBlockHash, Tokens(1));
  const int32_t b = a.Allocate();
  ASSERT_TRUE(a.Publish(b, h, Tokens(1)));
  EXPECT_EQ(a.Find(h, Tokens(7)), -1);  // same name, other tokens
}

TEST(BlockAllocatorTest, ATwinStaysPrivateAndIsFreedNotCached) {
  BlockAllocator a(2, /*prefix_caching=*/true);
  const BlockHash h = HashBlock(kRootBlockHash, Tokens(1));
  const int32_t first = a.Allocate();
  const int32_t twin = a.Allocate();
  ASSERT_TRUE(a.Publish(first, h, Tokens(1)));
  EXPECT_FALSE(a.Publish(twin, h, Tokens(1)));
  a.Free(twin);
  a.Free(first);
  EXPECT_EQ(a.num_cached(), 1);
  EXPECT_EQ(a.Allocate(), twin);  // from the free list; the cached one waits
  EXPECT_EQ(a.Find(h, Tokens(1)), first);
}

TEST(BlockAllocatorTest, WithPrefixCachingOffNothingIsPublishedOrFound) {
  BlockAllocator a(2);
  const BlockHash h = HashBlock(kRootBlockHash, Tokens(1));
  const int32_t b = a.Allocate();
  EXPECT_FALSE(a.Publish(b, h, Tokens(1)));
  EXPECT_EQ(a.Find(h, Tokens(1)), -1);
  a.Free(b);
  EXPECT_EQ(a.num_cached(), 0);
  EXPECT_EQ(a.num_free(), 2);
}

}  // namespace
}  // namespace joule
