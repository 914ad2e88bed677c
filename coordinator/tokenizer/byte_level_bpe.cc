// Hugging Face tokenizer.json reader for byte-level BPE (Qwen2/Qwen3,
// DeepSeek-V3, the built-in models).
//
// Encode follows Hugging Face's order: added tokens that are not "normalized"
// are cut out of the raw text first; the rest is normalized (NFC for Qwen),
// "normalized" added tokens are cut out of that, and what remains goes through
// the pre-tokenizer (regex splits) and BPE word by word.
#include <array>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status.h"
#include "coordinator/tokenizer/bpe.h"
#include "coordinator/tokenizer/byte_level.h"
#include "coordinator/tokenizer/post_processor.h"
#include "coordinator/tokenizer/pre_tokenizer.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer {
namespace {

using Json = nlohmann::json;
using internal::BpeModel;
using internal::Normalizer;
using internal::PreTokenizer;
using internal::SpecialTokenTemplate;

// Ids index a table of vocab_size() entries: an id in the billions would have
// the coordinator allocate gigabytes at start-up. Real vocabularies stay far
// below this (Qwen3: 151,669; DeepSeek-V3: 129,280).
constexpr int64_t kMaxTokenId = (1 << 22) - 1;

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool normalized = false;  // matched in normalized text rather than raw text
};

// Finds added tokens in text: a byte trie, longest match at the leftmost
// position (Hugging Face's leftmost-longest). Most bytes cannot start a token
// and are rejected by one table lookup.
class AddedTokenMatcher {
 public:
  void Add(std::string_view content, int32_t id) {
    first_byte_[static_cast<uint8_t>(content[0])] = true;
    int32_t node = 0;
    for (char c : content) {
      auto [it, inserted] = next_.try_emplace(Edge(node, c), static_cast<int32_t>(ids_.size()));
      if (inserted) ids_.push_back(-1);
      node = it->second;
    }
    ids_[node] = id;
  }

  bool empty() const { return ids_.size() == 1; }

  // Id of the longest token that starts at text[pos] (its length in *len), or -1.
  int32_t LongestAt(std::string_view text, size_t pos, size_t* len) const {
    if (!first_byte_[static_cast<uint8_t>(text[pos])]) return -1;
    int32_t node = 0;
    int32_t found = -1;
    for (size_t i = pos; i < text.size(); ++i) {
      auto it = next_.find(Edge(node, text[i]));
      if (it == next_.end()) break;
      node = it->second;
      if (ids_[node] >= 0) {
        found = ids_[node];
        *len = i + 1 - pos;
      }
    }
    return found;
  }

  // Calls on_text for the text between tokens and on_token for each token.
  template <typename OnText, typename OnToken>
  absl::Status Scan(std::string_view text, OnText on_text, OnToken on_token) const {
    size_t start = 0;
    if (!empty()) {
      for (size_t i = 0; i < text.size();) {
        size_t len = 0;
        int32_t id = LongestAt(text, i, &len);
        if (id < 0) {
          ++i;
          continue;
        }
        if (i > start) RETURN_IF_ERROR(on_text(text.substr(start, i - start)));
        on_token(id);
        i += len;
        start = i;
      }
    }
    if (start < text.size()) RETURN_IF_ERROR(on_text(text.substr(start)));
    return absl::OkStatus();
  }

 private:
  static uint64_t Edge(int32_t node, char c) {
    return (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
  }
  std::array<bool, 256> first_byte_{};
  absl::flat_hash_map<uint64_t, int32_t> next_;
  std::vector<int32_t> ids_ = {-1};  // per trie node: the token ending there, or -1
};

class ByteLevelBpeTokenizer final : public Tokenizer {
 public:
  ByteLevelBpeTokenizer(std::vector<std::string> id_to_bytes, std::vector<bool> known,
                        const std::vector<AddedToken>& added, Normalizer normalizer,
                        PreTokenizer pre_tokenizer, std::unique_ptr<BpeModel> bpe)
      : id_to_bytes_(std::move(id_to_bytes)),
        known_(std::move(known)),
        special_(id_to_bytes_.size(), false),
        normalizer_(normalizer),
        pre_tokenizer_(std::move(pre_tokenizer)),
        bpe_(std::move(bpe)) {
    for (const AddedToken& t : added) {
      id_to_bytes_[t.id] = t.content;
      known_[t.id] = true;
      special_[t.id] = t.special;
      added_by_content_[t.content] = t.id;
      (t.normalized ? normalized_added_ : raw_added_).Add(t.content, t.id);
    }
    // With no merges, BPE spells every byte alone, so splitting into words
    // cannot change the ids: the built-in byte-level models take this path,
    // which also accepts text that is not UTF-8.
    bytes_only_ = bpe_->num_merges() == 0 && !bpe_->ignore_merges() && normalizer_.is_identity() &&
                  pre_tokenizer_.preserves_text();
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 4);
    if (!bytes_only_) {
      size_t bad = internal::FindInvalidUtf8(text);
      if (bad != text.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("text is not valid UTF-8 (byte offset ", bad, ")"));
      }
    }
    auto push_token = [&](int32_t id) { ids.push_back(id); };
    std::string normalized;
    auto encode_words = [&](std::string_view piece) -> absl::Status {
      if (bytes_only_) {
        bpe_->EncodeWord(piece, &ids);
        return absl::OkStatus();
      }
      return pre_tokenizer_.Split(piece,
                                  [&](std::string_view word) { bpe_->EncodeWord(word, &ids); });
    };
    auto encode_raw_piece = [&](std::string_view piece) -> absl::Status {
      if (normalizer_.is_identity()) return normalized_added_.Scan(piece, encode_words, push_token);
      RETURN_IF_ERROR(normalizer_.Apply(piece, &normalized));
      return normalized_added_.Scan(normalized, encode_words, push_token);
    };
    RETURN_IF_ERROR(raw_added_.Scan(text, encode_raw_piece, push_token));
    return ids;
  }

  absl::StatusOr<std::vector<int32_t>> EncodeWithSpecialTokens(std::string_view text) const override {
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, Encode(text));
    ids.insert(ids.begin(), special_template_.prefix.begin(), special_template_.prefix.end());
    ids.insert(ids.end(), special_template_.suffix.begin(), special_template_.suffix.end());
    return ids;
  }

  void set_special_template(SpecialTokenTemplate special) { special_template_ = std::move(special); }

  std::string TokenBytes(int32_t id) const override {
    if (id < 0 || id >= vocab_size() || !known_[id]) return std::string();
    return id_to_bytes_[id];
  }

  std::string Decode(const std::vector<int32_t>& ids) const override {
    std::string bytes;
    for (int32_t id : ids) {
      if (id >= 0 && id < vocab_size()) bytes += id_to_bytes_[id];
    }
    std::string out;
    AppendValidUtf8(bytes, /*final=*/true, &out);
    return out;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(id_to_bytes_.size()); }

  std::optional<int32_t> TokenId(std::string_view content) const override {
    auto it = added_by_content_.find(absl::string_view(content.data(), content.size()));
    if (it == added_by_content_.end()) return std::nullopt;
    return it->second;
  }

  bool IsSpecial(int32_t id) const override { return id >= 0 && id < vocab_size() && special_[id]; }

 private:
  std::vector<std::string> id_to_bytes_;
  std::vector<bool> known_;
  std::vector<bool> special_;
  SpecialTokenTemplate special_template_;  // what EncodeWithSpecialTokens adds
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  AddedTokenMatcher raw_added_;         // normalized: false
  AddedTokenMatcher normalized_added_;  // normalized: true
  Normalizer normalizer_;
  PreTokenizer pre_tokenizer_;
  std::unique_ptr<BpeModel> bpe_;
  bool bytes_only_ = false;
};

std::string TypeOf(const Json& node) {
  if (node.is_null()) return "null";
  if (node.is_object()) {
    auto type = node.find("type");
    if (type != node.end() && type->is_string()) return type->get<std::string>();
  }
  return node.type_name();
}

// Hugging Face's ByteLevel decoder maps characters back to bytes, which is
// what TokenBytes does; a Sequence of ByteLevel decoders is the same.
bool IsByteLevelDecoder(const Json& node) {
  std::string type = TypeOf(node);
  if (type == "ByteLevel") return true;
  if (type != "Sequence") return false;
  auto list = node.find("decoders");
  if (list == node.end() || !list->is_array() || list->empty()) return false;
  for (const Json& child : *list) {
    if (!IsByteLevelDecoder(child)) return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<ByteLevelBpeTokenizer>> Parse(std::string_view text) {
  auto bad = [](const std::string& field, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
  };
  Json root = Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return bad("(document)", "not valid JSON");
  if (!root.is_object()) return bad("(document)", "expected a JSON object");

  auto model = root.find("model");
  if (model == root.end() || !model->is_object()) return bad("model", "missing or not an object");
  auto type = model->find("type");
  if (type == model->end() || !type->is_string() || *type != "BPE") {
    return bad("model.type", absl::StrCat("expected \"BPE\", got ",
                                          type == model->end() ? "nothing" : type->dump()));
  }
  auto vocab = model->find("vocab");
  if (vocab == model->end() || !vocab->is_object() || vocab->empty()) {
    return bad("model.vocab", "missing or not a non-empty object");
  }
  auto pre_node = root.find("pre_tokenizer");
  ASSIGN_OR_RETURN(PreTokenizer pre_tokenizer,
                   PreTokenizer::Parse(pre_node == root.end() ? Json() : *pre_node));
  if (auto dec = root.find("decoder"); dec == root.end() || !IsByteLevelDecoder(*dec)) {
    return bad("decoder", absl::StrCat("expected ByteLevel, got ",
                                       dec == root.end() ? "nothing" : TypeOf(*dec)));
  }
  auto norm_node = root.find("normalizer");
  ASSIGN_OR_RETURN(Normalizer normalizer,
                   Normalizer::Parse(norm_node == root.end() ? Json() : *norm_node, "normalizer"));

  // Ids: vocabulary then added tokens; an added token may reuse a vocab id.
  std::vector<std::pair<int32_t, std::string>> entries;
  entries.reserve(vocab->size());
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > kMaxTokenId) {
      return bad(absl::StrCat("model.vocab[", Json(it.key()).dump(), "]"),
                 absl::StrCat("expected an integer id in [0, ", kMaxTokenId, "]"));
    }
    int32_t id = it.value().get<int32_t>();
    max_id = std::max<int64_t>(max_id, id);
    entries.emplace_back(id, it.key());
  }
  std::vector<AddedToken> added;
  if (auto list = root.find("added_tokens"); list != root.end() && !list->is_null()) {
    if (!list->is_array()) return bad("added_tokens", "expected an array");
    for (size_t i = 0; i < list->size(); ++i) {
      const Json& t = (*list)[i];
      std::string field = absl::StrCat("added_tokens[", i, "]");
      if (!t.is_object()) return bad(field, "expected an object");
      auto id = t.find("id");
      auto content = t.find("content");
      if (id == t.end() || !id->is_number_integer() || id->get<int64_t>() < 0 ||
          id->get<int64_t>() > kMaxTokenId) {
        return bad(field + ".id", absl::StrCat("expected an integer in [0, ", kMaxTokenId, "]"));
      }
      if (content == t.end() || !content->is_string() || content->get<std::string>().empty()) {
        return bad(field + ".content", "expected a non-empty string");
      }
      auto flag = [&](const char* key, bool fallback) -> absl::StatusOr<bool> {
        auto it = t.find(key);
        if (it == t.end() || it->is_null()) return fallback;
        if (!it->is_boolean()) return bad(absl::StrCat(field, ".", key), "expected true or false");
        return it->get<bool>();
      };
      AddedToken token{id->get<int32_t>(), content->get<std::string>()};
      ASSIGN_OR_RETURN(token.special, flag("special", false));
      // Hugging Face's default: special tokens match raw text, others normalized text.
      ASSIGN_OR_RETURN(token.normalized, flag("normalized", !token.special));
      // Whitespace stripping and word-boundary matching are not implemented;
      // the Qwen and DeepSeek files leave them off.
      for (const char* key : {"lstrip", "rstrip", "single_word"}) {
        ASSIGN_OR_RETURN(bool on, flag(key, false));
        if (on) return bad(absl::StrCat(field, ".", key), "true is not supported");
      }
      if (token.normalized && !normalizer.is_identity()) {
        std::string normalized_content;
        if (internal::FindInvalidUtf8(token.content) != token.content.size()) {
          return bad(field + ".content", "not valid UTF-8");
        }
        RETURN_IF_ERROR(normalizer.Apply(token.content, &normalized_content));
        token.content = std::move(normalized_content);
      }
      max_id = std::max<int64_t>(max_id, token.id);
      added.push_back(std::move(token));
    }
  }

  size_t size = static_cast<size_t>(max_id + 1);
  std::vector<std::string> id_to_bytes(size);
  std::vector<bool> known(size, false);
  absl::flat_hash_map<std::string, int32_t> key_to_id;
  key_to_id.reserve(entries.size());
  for (auto& [id, key] : entries) {
    id_to_bytes[id] = internal::VocabKeyToBytes(key);
    known[id] = true;
    key_to_id[std::move(key)] = id;
  }
  // Every byte must be spelled by some token, or some text could not be encoded.
  std::array<int32_t, 256> byte_to_id{};
  for (int b = 0; b < 256; ++b) {
    std::string key = internal::ByteToVocabKey(static_cast<uint8_t>(b));
    auto it = key_to_id.find(key);
    if (it == key_to_id.end()) {
      return bad("model.vocab",
                 absl::StrCat("no token for byte 0x", absl::Hex(b, absl::kZeroPad2), " (key ",
                              Json(key).dump(), "); not a byte-level vocabulary"));
    }
    byte_to_id[b] = it->second;
  }
  ASSIGN_OR_RETURN(std::unique_ptr<BpeModel> bpe, BpeModel::Parse(*model, key_to_id, byte_to_id));
  auto tokenizer = std::make_unique<ByteLevelBpeTokenizer>(
      std::move(id_to_bytes), std::move(known), added, normalizer, std::move(pre_tokenizer),
      std::move(bpe));
  auto post_node = root.find("post_processor");
  ASSIGN_OR_RETURN(SpecialTokenTemplate special,
                   internal::ParsePostProcessor(post_node == root.end() ? Json() : *post_node,
                                                tokenizer->vocab_size()));
  tokenizer->set_special_template(std::move(special));
  return tokenizer;
}

// tokenizer_config.json may replace the post-processor (LlamaTokenizerFast).
absl::Status ApplyTokenizerConfig(std::string_view text, ByteLevelBpeTokenizer* tokenizer) {
  Json config = Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded()) return absl::InvalidArgumentError("(document): not valid JSON");
  ASSIGN_OR_RETURN(std::optional<SpecialTokenTemplate> special,
                   internal::ParseLlamaSpecialTokens(
                       config, [&](std::string_view content) { return tokenizer->TokenId(content); }));
  if (special) tokenizer->set_special_template(*std::move(special));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view text,
                                                              std::string_view origin) {
  auto tokenizer = Parse(text);
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), origin);
  return std::unique_ptr<Tokenizer>(*std::move(tokenizer));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view text,
                                                              std::string_view origin,
                                                              std::string_view config_json,
                                                              std::string_view config_origin) {
  auto tokenizer = Parse(text);
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), origin);
  if (absl::Status s = ApplyTokenizerConfig(config_json, tokenizer->get()); !s.ok()) {
    return Annotate(s, config_origin);
  }
  return std::unique_ptr<Tokenizer>(*std::move(tokenizer));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir) {
  const std::string path = model_dir + "/tokenizer.json";
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  const std::string config_path = model_dir + "/tokenizer_config.json";
  if (!std::filesystem::exists(config_path)) return ParseTokenizerJson(text, path);
  ASSIGN_OR_RETURN(const std::string config, ReadFile(config_path));
  return ParseTokenizerJson(text, path, config, config_path);
}

}  // namespace joule::tokenizer
