// Byte-level BPE over one pre-tokenized word: merge ranks in a hash map, a
// heap over adjacent pairs (O(n log n) per word, so long words and whitespace
// runs stay linear-ish), and a bounded cache of recent words. Internal to
// joule_tokenizer.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json_fwd.hpp"

namespace joule::tokenizer::internal {

class BpeModel {
 public:
  // Words longer than this are not cached (as in Hugging Face); the cache is
  // emptied when it holds kCacheCapacity words, so memory stays bounded.
  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kCacheCapacity = 1 << 15;

  // `model` is tokenizer.json's "model" object; `key_to_id` its vocabulary
  // (byte-level keys); `byte_to_id` the id of each single byte. Errors name
  // the field (model.merges[i], model.ignore_merges).
  static absl::StatusOr<std::unique_ptr<BpeModel>> Parse(
      const nlohmann::json& model, const absl::flat_hash_map<std::string, int32_t>& key_to_id,
      const std::array<int32_t, 256>& byte_to_id);

  // Appends the ids of `word` (raw bytes) to *ids. Thread-safe.
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;

  size_t num_merges() const { return merges_.size(); }
  bool ignore_merges() const { return ignore_merges_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // of the merged token
  };
  BpeModel() = default;
  void MergeWord(std::string_view word, std::vector<int32_t>* ids) const;

  std::array<int32_t, 256> byte_to_id_{};
  absl::flat_hash_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> merge
  bool ignore_merges_ = false;
  absl::flat_hash_map<std::string, int32_t> bytes_to_id_;  // only with ignore_merges

  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace joule::tokenizer::internal
