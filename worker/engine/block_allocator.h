// BlockAllocator: the KV cache's block manager. Hands out fixed-size KV
// blocks, counts the sequences holding each, and with prefix caching keeps
// full blocks after their last holder lets go, so a later request with the
// same prefix reuses their K/V instead of computing it again (vLLM's
// automatic prefix caching). A full block is named by a 128-bit hash of its
// tokens chained with its parent block's hash, so equal tokens after a
// different prefix are a different block. Only bookkeeping: the K/V bytes
// stay where the backend put them, CPU or GPU alike.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace joule {

struct BlockHash {
  uint64_t lo = 0;
  uint64_t hi = 0;
  bool operator==(const BlockHash&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const BlockHash& b) {
    return H::combine(std::move(h), b.lo, b.hi);
  }
};

// The parent of a sequence's first block.
inline constexpr BlockHash kRootBlockHash{0x6a6f756c65505245ull, 0x4649582d43414348ull};

// The name of a full block holding `tokens` after the block named `parent`.
BlockHash HashBlock(const BlockHash& parent, std::span<const int32_t> tokens);

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks, bool prefix_caching = false);
  int64_t num_blocks() const { return num_blocks_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks Allocate() can hand out: never-held ones plus cached ones no
  // sequence holds (evicted on demand).
  int64_t num_free() const { return static_cast<int64_t>(free_.size()) + num_evictable_; }
  // Blocks whose content is published, held or not.
  int64_t num_cached() const { return static_cast<int64_t>(by_hash_.size()); }
  int ref_count(int32_t block) const { return Valid(block) ? refs_[block] : 0; }

  // A block with one holder: a free one, else the least recently released
  // cached one (forgotten). -1 when every block is held.
  int32_t Allocate();
  // Drops one holder. A published block left without holders stays cached;
  // others are free again. Unknown or unheld blocks are ignored.
  void Free(int32_t block);

  // The cached block named `hash` whose tokens equal `tokens`, or -1 (also
  // with prefix caching off). Comparing the tokens makes a hash collision a
  // miss instead of someone else's K/V.
  int32_t Find(const BlockHash& hash, std::span<const int32_t> tokens) const;
  // One more holder of a block (from Find); a cached one stops being evictable.
  void Share(int32_t block);
  // Publishes a full, computed, held block under `hash`. False (the block
  // stays private) with prefix caching off or when another block already
  // holds that content.
  bool Publish(int32_t block, const BlockHash& hash, std::span<const int32_t> tokens);

 private:
  bool Valid(int32_t block) const { return block >= 0 && block < num_blocks_; }
  // The evictable list: cached blocks without holders, least recently
  // released first; node num_blocks_ is its head and tail.
  void PushEvictable(int32_t block);
  void RemoveEvictable(int32_t block);
  void Forget(int32_t block);

  int64_t num_blocks_;
  bool prefix_caching_;
  std::vector<int32_t> free_;  // LIFO: recently freed blocks are warm in cache
  std::vector<int32_t> refs_;
  std::vector<bool> published_;
  std::vector<BlockHash> hash_;
  std::vector<std::vector<int32_t>> tokens_;  // of published blocks
  absl::flat_hash_map<BlockHash, int32_t> by_hash_;
  std::vector<int32_t> prev_, next_;  // evictable list links, size num_blocks_ + 1
  int64_t num_evictable_ = 0;
};

}  // namespace joule
