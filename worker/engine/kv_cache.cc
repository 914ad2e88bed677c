#include "worker/engine/kv_cache.h"

#include "absl/strings/str_cat.h"

namespace joule {

BlockAllocator::BlockAllocator(int64_t num_blocks)
    : num_blocks_(num_blocks), in_use_(num_blocks, false) {
  free_.reserve(num_blocks);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int32_t BlockAllocator::Allocate() {
  if (free_.empty()) return -1;
  int32_t b = free_.back();
  free_.pop_back();
  in_use_[b] = true;
  return b;
}

void BlockAllocator::Free(int32_t block) {
  if (block < 0 || block >= num_blocks_ || !in_use_[block]) return;  // double free is a no-op
  in_use_[block] = false;
  free_.push_back(block);
}

absl::StatusOr<std::unique_ptr<PagedKvCache>> PagedKvCache::Create(const ModelConfig& c,
                                                                   int block_size,
                                                                   int64_t budget_bytes) {
  if (block_size <= 0) return absl::InvalidArgumentError("kv cache: block_size must be positive");
  const int64_t per_block = static_cast<int64_t>(2) * c.num_layers * block_size *
                            c.num_key_value_heads * c.head_dim * sizeof(float);
  const int64_t blocks = budget_bytes / per_block;
  if (blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: budget of ", budget_bytes,
                                                   " bytes holds no block of ", per_block, " bytes"));
  }
  return std::unique_ptr<PagedKvCache>(new PagedKvCache(c, block_size, blocks));
}

PagedKvCache::PagedKvCache(const ModelConfig& c, int block_size, int64_t num_blocks)
    : block_size_(block_size), allocator_(num_blocks) {
  const int64_t per_layer = num_blocks * block_size * c.num_key_value_heads * c.head_dim;
  bytes_per_block_ = static_cast<int64_t>(2) * c.num_layers * block_size * c.num_key_value_heads *
                     c.head_dim * sizeof(float);
  storage_.reset(new float[static_cast<size_t>(2 * c.num_layers * per_layer)]());
  view_.block_size = block_size;
  view_.num_blocks = num_blocks;
  for (int l = 0; l < c.num_layers; ++l) {
    view_.k.push_back(storage_.get() + (2 * l) * per_layer);
    view_.v.push_back(storage_.get() + (2 * l + 1) * per_layer);
  }
}

double PagedKvCache::Usage() const {
  return 1.0 - static_cast<double>(allocator_.num_free()) / static_cast<double>(allocator_.num_blocks());
}

}  // namespace joule
