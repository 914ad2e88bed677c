#include "coordinator/tokenizer/bpe.h"

#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "coordinator/tokenizer/byte_level.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer::internal {
namespace {

using Json = nlohmann::json;

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Parse(
    const Json& model, const absl::flat_hash_map<std::string, int32_t>& key_to_id,
    const std::array<int32_t, 256>& byte_to_id) {
  std::unique_ptr<BpeModel> bpe(new BpeModel());
  bpe->byte_to_id_ = byte_to_id;

  // Options that change what BPE produces and that byte-level Qwen/DeepSeek
  // files leave off: refuse rather than encode differently from the model.
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() &&
        !(it->is_string() && it->get<std::string>().empty())) {
      return Bad(absl::StrCat("model.", key), absl::StrCat(it->dump(), " is not supported"));
    }
  }
  if (auto it = model.find("dropout");
      it != model.end() && !it->is_null() && !(it->is_number() && it->get<double>() == 0.0)) {
    return Bad("model.dropout",
               absl::StrCat(it->dump(), " is not supported (BPE dropout is for training)"));
  }
  if (auto it = model.find("ignore_merges"); it != model.end() && !it->is_null()) {
    if (!it->is_boolean()) return Bad("model.ignore_merges", "expected true or false");
    bpe->ignore_merges_ = it->get<bool>();
  }
  if (bpe->ignore_merges_) {
    for (const auto& [key, id] : key_to_id) bpe->bytes_to_id_[VocabKeyToBytes(key)] = id;
  }

  auto merges = model.find("merges");
  if (merges == model.end() || merges->is_null()) return bpe;
  if (!merges->is_array()) return Bad("model.merges", "expected an array");
  bpe->merges_.reserve(merges->size());
  std::string left, right;
  for (size_t i = 0; i < merges->size(); ++i) {
    const Json& m = (*merges)[i];
    // Two spellings exist: "a b" (tokenizers < 0.20) and ["a", "b"].
    bool ok = false;
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t space = s.find(' ');
      if (space != std::string::npos && space > 0 && space + 1 < s.size() &&
          s.find(' ', space + 1) == std::string::npos) {
        left = s.substr(0, space);
        right = s.substr(space + 1);
        ok = true;
      }
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
      ok = !left.empty() && !right.empty();
    }
    std::string field = absl::StrCat("model.merges[", i, "]");
    if (!ok) {
      return Bad(field, absl::StrCat("expected \"A B\" or [\"A\", \"B\"], got ", m.dump()));
    }
    auto l = key_to_id.find(left);
    auto r = key_to_id.find(right);
    auto merged = key_to_id.find(left + right);
    for (auto [it, key] : {std::pair{l, &left}, std::pair{r, &right}}) {
      if (it == key_to_id.end()) {
        return Bad(field, absl::StrCat("token ", Json(*key).dump(), " is not in model.vocab"));
      }
    }
    if (merged == key_to_id.end()) {
      return Bad(field, absl::StrCat("merged token ", Json(left + right).dump(),
                                     " is not in model.vocab"));
    }
    // A repeated pair keeps its last rank, as Hugging Face's map does.
    bpe->merges_[PairKey(l->second, r->second)] = Merge{static_cast<int32_t>(i), merged->second};
  }
  return bpe;
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = bytes_to_id_.find(absl::string_view(word.data(), word.size()));
    if (it != bytes_to_id_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  if (word.size() == 1 || merges_.empty()) {
    for (char c : word) ids->push_back(byte_to_id_[static_cast<uint8_t>(c)]);
    return;
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  absl::string_view key(word.data(), word.size());
  if (cacheable) {
    absl::ReaderMutexLock lock(&cache_mu_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = ids->size();
  MergeWord(word, ids);
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() >= kCacheCapacity) cache_.clear();
    cache_.try_emplace(key, ids->begin() + first, ids->end());
  }
}

void BpeModel::MergeWord(std::string_view word, std::vector<int32_t>* ids) const {
  // Symbols form a doubly linked list over the word's bytes; merged-away
  // symbols get len 0. The heap holds candidate merges ordered by (rank,
  // position), so the lowest rank wins and ties go to the leftmost pair, as in
  // Hugging Face. Entries made stale by an earlier merge are skipped on pop.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t len;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(n);
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] =
        Symbol{byte_to_id_[static_cast<uint8_t>(word[i])], i - 1, i + 1 < n ? i + 1 : -1, 1};
  }
  std::vector<Candidate> storage;
  storage.reserve(n);
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap(
      std::greater<Candidate>(), std::move(storage));
  auto consider = [&](int32_t pos) {
    int32_t next = symbols[pos].next;
    if (next < 0) return;
    auto it = merges_.find(PairKey(symbols[pos].id, symbols[next].id));
    if (it != merges_.end()) heap.push(Candidate{it->second.rank, pos, it->second.id});
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    Candidate top = heap.top();
    heap.pop();
    Symbol& left = symbols[top.pos];
    if (left.len == 0 || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.id != top.id) continue;  // stale
    left.id = top.id;
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = symbols[i].next) ids->push_back(symbols[i].id);
}

}  // namespace joule::tokenizer::internal
