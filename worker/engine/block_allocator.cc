#include "worker/engine/block_allocator.h"

#include <algorithm>

namespace joule {
namespace {

// A bijective 64-bit finalizer (Stafford's variant 13 of MurmurHash3's).
uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

}  // namespace

BlockHash HashBlock(const BlockHash& parent, std::span<const int32_t> tokens) {
  // Two lanes with different seeds and token encodings, each over the whole
  // parent, so the halves do not collide together.
  uint64_t lo = Mix(parent.lo ^ Mix(parent.hi ^ 0x243f6a8885a308d3ull));
  uint64_t hi = Mix(parent.hi + Mix(parent.lo ^ 0x13198a2e03707344ull));
  for (int32_t t : tokens) {
    const uint64_t v = static_cast<uint32_t>(t);
    lo = Mix(lo ^ (v + 0x9e3779b97f4a7c15ull));
    hi = Mix(hi + (v * 0xc2b2ae3d27d4eb4full) + 0xa4093822299f31d0ull);
  }
  return {Mix(lo ^ tokens.size()), Mix(hi + tokens.size())};
}

BlockAllocator::BlockAllocator(int64_t num_blocks, bool prefix_caching)
    : num_blocks_(num_blocks),
      prefix_caching_(prefix_caching),
      refs_(num_blocks, 0),
      published_(num_blocks, false),
      hash_(num_blocks),
      tokens_(num_blocks),
      prev_(num_blocks + 1),
      next_(num_blocks + 1) {
  free_.reserve(num_blocks);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  const auto head = static_cast<int32_t>(num_blocks);
  prev_[head] = next_[head] = head;
}

int32_t BlockAllocator::Allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (num_evictable_ > 0) {
    b = next_[num_blocks_];  // least recently released
    RemoveEvictable(b);
    Forget(b);
  } else {
    return -1;
  }
  refs_[b] = 1;
  return b;
}

void BlockAllocator::Free(int32_t block) {
  if (!Valid(block) || refs_[block] == 0) return;  // double free is a no-op
  if (--refs_[block] > 0) return;
  if (published_[block]) {
    PushEvictable(block);
  } else {
    free_.push_back(block);
  }
}

int32_t BlockAllocator::Find(const BlockHash& hash, std::span<const int32_t> tokens) const {
  if (!prefix_caching_) return -1;
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  const std::vector<int32_t>& held = tokens_[it->second];
  if (!std::equal(held.begin(), held.end(), tokens.begin(), tokens.end())) return -1;
  return it->second;
}

void BlockAllocator::Share(int32_t block) {
  if (!Valid(block)) return;
  if (refs_[block]++ == 0 && published_[block]) RemoveEvictable(block);
}

bool BlockAllocator::Publish(int32_t block, const BlockHash& hash, std::span<const int32_t> tokens) {
  if (!prefix_caching_ || !Valid(block) || refs_[block] == 0 || published_[block]) return false;
  if (!by_hash_.emplace(hash, block).second) return false;  // a twin computed it too
  published_[block] = true;
  hash_[block] = hash;
  tokens_[block].assign(tokens.begin(), tokens.end());
  return true;
}

void BlockAllocator::PushEvictable(int32_t block) {
  const auto head = static_cast<int32_t>(num_blocks_);
  const int32_t last = prev_[head];
  prev_[block] = last;
  next_[block] = head;
  next_[last] = block;
  prev_[head] = block;
  ++num_evictable_;
}

void BlockAllocator::RemoveEvictable(int32_t block) {
  next_[prev_[block]] = next_[block];
  prev_[next_[block]] = prev_[block];
  --num_evictable_;
}

void BlockAllocator::Forget(int32_t block) {
  by_hash_.erase(hash_[block]);
  published_[block] = false;
  tokens_[block].clear();
}

}  // namespace joule
