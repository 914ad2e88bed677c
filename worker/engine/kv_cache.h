// Paged KV cache: fixed-size blocks carved from a byte budget in the
// backend's memory (F32 on the CPU, BF16 on a GPU), handed to sequences on
// demand and returned when they finish or are cancelled (block_allocator.h:
// with prefix caching, full blocks stay cached for the next request).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/device/backend.h"
#include "worker/engine/block_allocator.h"
#include "worker/model/config.h"
#include "worker/model/model.h"

namespace joule {

class PagedKvCache {
 public:
  // Bytes of one block: K and V of every layer (MLA: the latent rows, no V),
  // in the backend's KV type.
  static int64_t BlockBytes(const ModelConfig& config, int block_size, kernels::DType type);
  // Sizes the cache to as many blocks as fit in `budget_bytes` and allocates
  // them, zeroed (so resident up front: no page faults on the decode path).
  // `prefix_caching`: the allocator keeps released full blocks for reuse.
  static absl::StatusOr<std::unique_ptr<PagedKvCache>> Create(device::Backend& backend,
                                                              const ModelConfig& config,
                                                              int block_size, int64_t budget_bytes,
                                                              bool prefix_caching = false);

  int block_size() const { return view_.block_size; }
  int64_t BytesPerBlock() const { return bytes_per_block_; }
  const KvCacheView& view() const { return view_; }
  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }
  // Fraction of blocks held by sequences (cached, unheld ones count as free), for metrics.
  double Usage() const;

 private:
  PagedKvCache(device::Buffer storage, KvCacheView view, int64_t bytes_per_block,
               bool prefix_caching);
  int64_t bytes_per_block_;
  device::Buffer storage_;  // [layers][k|v][num_blocks * block_size * kv_heads * head_dim]
                            // (MLA: [layers][num_blocks * block_size * MlaCacheRow])
  KvCacheView view_;
  BlockAllocator allocator_;
};

}  // namespace joule
