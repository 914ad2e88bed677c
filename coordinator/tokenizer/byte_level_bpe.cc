// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json, and the
// writer of the built-in models' tokenizer.json.
//
// Byte level means every token string is spelled in GPT-2's bytes_to_unicode
// alphabet: each byte is shown as one printable character, so decoding is a
// table lookup per character and any byte string can be encoded.
#include <array>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer {
namespace {

using Json = nlohmann::json;

// GPT-2's bytes_to_unicode: printable latin-1 bytes stand for themselves, the
// other 68 bytes map to U+0100.. in byte order.
std::array<uint32_t, 256> BuildByteToCodepoint() {
  std::array<uint32_t, 256> table{};
  auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = printable(b) ? static_cast<uint32_t>(b) : next++;
  return table;
}

const std::array<uint32_t, 256>& ByteToCodepoint() {
  static const std::array<uint32_t, 256> table = BuildByteToCodepoint();
  return table;
}

void AppendCodepointUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string ByteToVocabKey(uint8_t b) {
  std::string key;
  AppendCodepointUtf8(ByteToCodepoint()[b], &key);
  return key;
}

// Raw bytes spelled by a vocabulary key. Characters outside the byte alphabet
// (not produced by byte-level vocabularies, but tolerated as Hugging Face's
// ByteLevel decoder does) stand for their own UTF-8.
std::string VocabKeyToBytes(std::string_view key) {
  static const absl::flat_hash_map<uint32_t, uint8_t> inverse = [] {
    absl::flat_hash_map<uint32_t, uint8_t> m;
    for (int b = 0; b < 256; ++b) m[ByteToCodepoint()[b]] = static_cast<uint8_t>(b);
    return m;
  }();
  std::string out;
  size_t i = 0;
  while (i < key.size()) {
    uint8_t c = static_cast<uint8_t>(key[i]);
    size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (i + len > key.size()) len = key.size() - i;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t j = 1; j < len; ++j) cp = (cp << 6) | (static_cast<uint8_t>(key[i + j]) & 0x3F);
    auto it = inverse.find(cp);
    if (it != inverse.end()) {
      out.push_back(static_cast<char>(it->second));
    } else {
      out.append(key.substr(i, len));
    }
    i += len;
  }
  return out;
}

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
};

class ByteLevelBpeTokenizer final : public Tokenizer {
 public:
  ByteLevelBpeTokenizer(std::vector<std::string> id_to_bytes, std::vector<bool> known,
                        std::array<int32_t, 256> byte_to_id, std::vector<AddedToken> added,
                        size_t num_merges, std::string encode_unsupported)
      : id_to_bytes_(std::move(id_to_bytes)),
        known_(std::move(known)),
        byte_to_id_(byte_to_id),
        added_(std::move(added)),
        num_merges_(num_merges),
        encode_unsupported_(std::move(encode_unsupported)),
        special_(id_to_bytes_.size(), false) {
    for (size_t i = 0; i < added_.size(); ++i) {
      const AddedToken& t = added_[i];
      id_to_bytes_[t.id] = t.content;
      known_[t.id] = true;
      special_[t.id] = t.special;
      added_by_content_[t.content] = t.id;
      added_by_first_byte_[static_cast<uint8_t>(t.content[0])].push_back(i);
    }
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const override {
    if (!encode_unsupported_.empty()) return absl::UnimplementedError(encode_unsupported_);
    if (num_merges_ > 0) {
      return absl::UnimplementedError(absl::StrCat(
          "tokenizer.json has ", num_merges_,
          " BPE merges; full BPE arrives with the HTTP front door, use --prompt-ids"));
    }
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    size_t i = 0;
    while (i < text.size()) {
      // Longest added token starting here, if any.
      const AddedToken* match = nullptr;
      for (size_t k : added_by_first_byte_[static_cast<uint8_t>(text[i])]) {
        const AddedToken& t = added_[k];
        if (text.substr(i, t.content.size()) == t.content &&
            (match == nullptr || t.content.size() > match->content.size())) {
          match = &t;
        }
      }
      if (match != nullptr) {
        ids.push_back(match->id);
        i += match->content.size();
      } else {
        ids.push_back(byte_to_id_[static_cast<uint8_t>(text[i])]);
        ++i;
      }
    }
    return ids;
  }

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

  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && special_[id];
  }

 private:
  std::vector<std::string> id_to_bytes_;
  std::vector<bool> known_;
  std::array<int32_t, 256> byte_to_id_;
  std::vector<AddedToken> added_;
  size_t num_merges_;
  std::string encode_unsupported_;  // why Encode cannot run, or empty
  std::vector<bool> special_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  std::array<std::vector<size_t>, 256> added_by_first_byte_;
};

bool HasByteLevel(const Json& node) {
  if (!node.is_object()) return false;
  auto type = node.find("type");
  if (type == node.end() || !type->is_string()) return false;
  if (*type == "ByteLevel") return true;
  if (*type == "Sequence") {
    for (const char* key : {"pretokenizers", "decoders"}) {
      auto list = node.find(key);
      if (list != node.end() && list->is_array()) {
        for (const Json& child : *list) {
          if (HasByteLevel(child)) return true;
        }
      }
    }
  }
  return false;
}

std::string TypeOf(const Json& node) {
  if (node.is_null()) return "null";
  if (node.is_object()) {
    auto type = node.find("type");
    if (type != node.end() && type->is_string()) return type->get<std::string>();
  }
  return node.type_name();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view text,
                                                              std::string_view origin_view) {
  // Debian's Abseil has its own absl::string_view, so StrCat wants std::string.
  const std::string origin(origin_view);
  auto bad = [&](const std::string& field, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", field, ": ", what));
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
  size_t num_merges = 0;
  if (auto merges = model->find("merges"); merges != model->end()) {
    if (!merges->is_array()) return bad("model.merges", "expected an array");
    num_merges = merges->size();
  }
  if (auto pre = root.find("pre_tokenizer"); pre == root.end() || !HasByteLevel(*pre)) {
    return bad("pre_tokenizer", absl::StrCat("expected ByteLevel, got ",
                                             pre == root.end() ? "nothing" : TypeOf(*pre)));
  }
  if (auto dec = root.find("decoder"); dec == root.end() || !HasByteLevel(*dec)) {
    return bad("decoder", absl::StrCat("expected ByteLevel, got ",
                                       dec == root.end() ? "nothing" : TypeOf(*dec)));
  }

  // Encoding features this reader does not implement yet make Encode fail
  // clearly; decoding still works, so prompt ids can be used meanwhile.
  std::string encode_unsupported;
  if (auto norm = root.find("normalizer"); norm != root.end() && !norm->is_null()) {
    encode_unsupported = absl::StrCat(origin, ": normalizer ", TypeOf(*norm),
                                      " is not supported yet; use --prompt-ids");
  }
  if (auto prefix = root["pre_tokenizer"].find("add_prefix_space");
      prefix != root["pre_tokenizer"].end() && prefix->is_boolean() && prefix->get<bool>()) {
    encode_unsupported = absl::StrCat(
        origin, ": pre_tokenizer.add_prefix_space=true is not supported yet; use --prompt-ids");
  }

  // Ids: vocabulary then added tokens; an added token may reuse a vocab id.
  std::vector<std::pair<int32_t, std::string>> entries;
  entries.reserve(vocab->size());
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > INT32_MAX - 1) {
      return bad(absl::StrCat("model.vocab[", Json(it.key()).dump(), "]"),
                 "expected a non-negative integer id");
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
          id->get<int64_t>() > INT32_MAX - 1) {
        return bad(field + ".id", "expected a non-negative integer");
      }
      if (content == t.end() || !content->is_string() || content->get<std::string>().empty()) {
        return bad(field + ".content", "expected a non-empty string");
      }
      auto special = t.find("special");
      AddedToken token{id->get<int32_t>(), content->get<std::string>(),
                       special != t.end() && special->is_boolean() && special->get<bool>()};
      max_id = std::max<int64_t>(max_id, token.id);
      added.push_back(std::move(token));
    }
  }

  size_t size = static_cast<size_t>(max_id + 1);
  std::vector<std::string> id_to_bytes(size);
  std::vector<bool> known(size, false);
  absl::flat_hash_map<std::string, int32_t> key_to_id;
  for (auto& [id, key] : entries) {
    id_to_bytes[id] = VocabKeyToBytes(key);
    known[id] = true;
    key_to_id[key] = id;
  }
  // Every byte must be spelled by some token, or some text could not be encoded.
  std::array<int32_t, 256> byte_to_id{};
  for (int b = 0; b < 256; ++b) {
    std::string key = ByteToVocabKey(static_cast<uint8_t>(b));
    auto it = key_to_id.find(key);
    if (it == key_to_id.end()) {
      return bad("model.vocab", absl::StrCat("no token for byte 0x", absl::Hex(b, absl::kZeroPad2),
                                             " (key ", Json(key).dump(),
                                             "); not a byte-level vocabulary"));
    }
    byte_to_id[b] = it->second;
  }
  return std::make_unique<ByteLevelBpeTokenizer>(std::move(id_to_bytes), std::move(known),
                                                 byte_to_id, std::move(added), num_merges,
                                                 std::move(encode_unsupported));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir) {
  std::string path = model_dir + "/tokenizer.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return ParseTokenizerJson(buffer.str(), path);
}

std::string MakeByteLevelTokenizerJson() {
  using OrderedJson = nlohmann::ordered_json;
  OrderedJson byte_level = {{"type", "ByteLevel"},
                            {"add_prefix_space", false},
                            {"trim_offsets", true},
                            {"use_regex", true}};
  OrderedJson added = OrderedJson::array();
  int32_t id = 256;
  for (const char* content : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    added.push_back({{"id", id++},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  OrderedJson vocab = OrderedJson::object();
  for (int b = 0; b < 256; ++b) vocab[ByteToVocabKey(static_cast<uint8_t>(b))] = b;
  OrderedJson model = {{"type", "BPE"},
                       {"dropout", nullptr},
                       {"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false},
                       {"byte_fallback", false},
                       {"vocab", std::move(vocab)},
                       {"merges", OrderedJson::array()}};
  OrderedJson root = {{"version", "1.0"},
                      {"truncation", nullptr},
                      {"padding", nullptr},
                      {"added_tokens", std::move(added)},
                      {"normalizer", nullptr},
                      {"pre_tokenizer", byte_level},
                      {"post_processor", byte_level},
                      {"decoder", byte_level},
                      {"model", std::move(model)}};
  return root.dump(2) + "\n";
}

}  // namespace joule::tokenizer
