#include "scheduler/prefix_index.h"

#include <algorithm>

#include "absl/hash/hash.h"

namespace joule::scheduler {

std::vector<uint64_t> PrefixIndex::BlockHashes(absl::Span<const int32_t> tokens, int block_tokens) {
  std::vector<uint64_t> out;
  if (block_tokens <= 0) return out;
  uint64_t previous = 0;
  for (size_t start = 0; start + block_tokens <= tokens.size(); start += block_tokens) {
    previous = absl::HashOf(previous, tokens.subspan(start, block_tokens));
    out.push_back(previous);
  }
  return out;
}

absl::flat_hash_map<int, int64_t> PrefixIndex::LeadingBlocks(absl::Span<const uint64_t> blocks) const {
  absl::flat_hash_map<int, int64_t> out;
  std::vector<int> holding;  // ranks holding every block so far
  for (size_t i = 0; i < blocks.size(); ++i) {
    auto it = blocks_.find(blocks[i]);
    if (it == blocks_.end()) break;
    const std::vector<int>& ranks = it->second.ranks;
    if (i == 0) {
      holding = ranks;
    } else {
      std::erase_if(holding, [&](int r) { return std::find(ranks.begin(), ranks.end(), r) == ranks.end(); });
    }
    if (holding.empty()) break;
    for (int r : holding) out[r] = static_cast<int64_t>(i) + 1;
  }
  return out;
}

void PrefixIndex::Insert(int rank, absl::Span<const uint64_t> blocks) {
  for (uint64_t h : blocks) {
    auto [it, inserted] = blocks_.try_emplace(h);
    Entry& e = it->second;
    if (inserted) {
      recent_.push_front(h);
    } else {
      recent_.splice(recent_.begin(), recent_, e.recent);
    }
    e.recent = recent_.begin();
    if (std::find(e.ranks.begin(), e.ranks.end(), rank) == e.ranks.end()) e.ranks.push_back(rank);
  }
  while (blocks_.size() > max_blocks_) {
    blocks_.erase(recent_.back());
    recent_.pop_back();
  }
}

void PrefixIndex::ForgetRank(int rank) {
  for (auto it = blocks_.begin(); it != blocks_.end();) {
    std::vector<int>& ranks = it->second.ranks;
    std::erase(ranks, rank);
    if (ranks.empty()) {
      recent_.erase(it->second.recent);
      blocks_.erase(it++);
    } else {
      ++it;
    }
  }
}

}  // namespace joule::scheduler
