#include "worker/engine/kv_cache.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/mla.h"

namespace joule {

namespace {

// Elements one token stores per layer in the K (and V) cache: a key row per KV
// head, or MLA's one latent row (worker/model/mla.h), which has no V cache.
int64_t KeyRow(const ModelConfig& c) {
  return c.UsesMla() ? MlaCacheRow(c.mla) : int64_t{c.num_key_value_heads} * c.head_dim;
}

}  // namespace

int64_t PagedKvCache::BlockBytes(const ModelConfig& c, int block_size, kernels::DType type) {
  const int64_t caches = c.UsesMla() ? 1 : 2;
  return caches * c.num_layers * block_size * KeyRow(c) *
         static_cast<int64_t>(kernels::ElementBytes(type));
}

absl::StatusOr<std::unique_ptr<PagedKvCache>> PagedKvCache::Create(device::Backend& backend,
                                                                   const ModelConfig& c,
                                                                   int block_size,
                                                                   int64_t budget_bytes,
                                                                   bool prefix_caching) {
  if (block_size <= 0) return absl::InvalidArgumentError("kv cache: block_size must be positive");
  const kernels::DType type = backend.kv_cache_type();
  const int64_t per_block = BlockBytes(c, block_size, type);
  const int64_t blocks = budget_bytes / per_block;
  if (blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: budget of ", budget_bytes,
                                                   " bytes holds no block of ", per_block, " bytes"));
  }
  ASSIGN_OR_RETURN(device::Buffer storage,
                   backend.Allocate(device::MemoryKind::kDevice, static_cast<size_t>(blocks * per_block)));
  KvCacheView view{.block_size = block_size, .num_blocks = blocks, .type = type};
  const size_t per_layer = static_cast<size_t>(blocks * block_size * KeyRow(c)) *
                           kernels::ElementBytes(type);
  auto* base = storage.as<std::byte>();
  for (int l = 0; l < c.num_layers; ++l) {
    if (c.UsesMla()) {
      view.k.push_back(base + l * per_layer);
      view.v.push_back(nullptr);
    } else {
      view.k.push_back(base + (2 * l) * per_layer);
      view.v.push_back(base + (2 * l + 1) * per_layer);
    }
  }
  return std::unique_ptr<PagedKvCache>(
      new PagedKvCache(std::move(storage), std::move(view), per_block, prefix_caching));
}

PagedKvCache::PagedKvCache(device::Buffer storage, KvCacheView view, int64_t bytes_per_block,
                           bool prefix_caching)
    : bytes_per_block_(bytes_per_block),
      storage_(std::move(storage)),
      view_(std::move(view)),
      allocator_(view_.num_blocks, prefix_caching) {}

double PagedKvCache::Usage() const {
  return 1.0 - static_cast<double>(allocator_.num_free()) / static_cast<double>(allocator_.num_blocks());
}

}  // namespace joule
