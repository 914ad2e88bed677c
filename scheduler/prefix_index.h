// The coordinator's guess at which rank holds a prompt's prefix in its KV
// cache, for routing requests to cache hits (as SGLang's cache-aware router
// and llm-d's prefix scorer do). Each worker runs attention for its own
// requests, so a prefix cached on rank 0 saves nothing on rank 1.
//
// Prompts are cut into blocks of `block_tokens` tokens, each named by a hash
// chained with the block before it (the scheme of the workers' block
// allocator); the index remembers which ranks were sent which blocks. It
// learns only from its own routing, so it can be wrong (a worker evicted the
// blocks): a wrong guess costs a recompute, never a wrong answer. Bounded:
// the least recently used blocks are forgotten first.
#pragma once

#include <cstdint>
#include <list>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"

namespace joule::scheduler {

class PrefixIndex {
 public:
  explicit PrefixIndex(size_t max_blocks) : max_blocks_(max_blocks) {}

  // Chained hashes of the full blocks of `tokens` (a partial last block has none).
  static std::vector<uint64_t> BlockHashes(absl::Span<const int32_t> tokens, int block_tokens);

  // For every rank believed to hold blocks[0..n) for some n > 0: that n.
  absl::flat_hash_map<int, int64_t> LeadingBlocks(absl::Span<const uint64_t> blocks) const;
  // `rank` was sent a prompt with these blocks (it computes or holds them now).
  void Insert(int rank, absl::Span<const uint64_t> blocks);
  // The rank is gone (its cache with it).
  void ForgetRank(int rank);
  size_t size() const { return blocks_.size(); }

 private:
  struct Entry {
    std::vector<int> ranks;
    std::list<uint64_t>::iterator recent;  // position in recent_
  };
  const size_t max_blocks_;
  absl::flat_hash_map<uint64_t, Entry> blocks_;
  std::list<uint64_t> recent_;  // most recently sent first
};

}  // namespace joule::scheduler
