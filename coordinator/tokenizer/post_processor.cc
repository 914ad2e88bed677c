#include "coordinator/tokenizer/post_processor.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer::internal {
namespace {

using Json = nlohmann::json;

absl::Status Bad(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// node[key] when node is an object holding a string there; else nullptr.
const std::string* StringAt(const Json& node, const char* key) {
  if (!node.is_object()) return nullptr;
  auto it = node.find(key);
  return it != node.end() && it->is_string() ? it->get_ptr<const std::string*>() : nullptr;
}

// The ids of special token `name` in a TemplateProcessing's special_tokens.
absl::StatusOr<std::vector<int32_t>> SpecialTokenIds(const Json& node, const std::string& field,
                                                     const std::string& name, int32_t vocab_size) {
  const std::string entry = absl::StrCat(field, ".special_tokens[", Json(name).dump(), "]");
  auto specials = node.find("special_tokens");
  if (specials == node.end() || !specials->is_object() || !specials->contains(name)) {
    return Bad(entry, "missing (the template names it)");
  }
  const Json& token = (*specials)[name];
  auto ids = token.is_object() ? token.find("ids") : token.end();
  if (!token.is_object() || ids == token.end() || !ids->is_array()) {
    return Bad(entry + ".ids", "expected an array of token ids");
  }
  std::vector<int32_t> out;
  for (const Json& id : *ids) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab_size) {
      return Bad(entry + ".ids", absl::StrCat("id ", id.dump(), " is not in the vocabulary [0, ",
                                              vocab_size, ")"));
    }
    out.push_back(id.get<int32_t>());
  }
  return out;
}

// TemplateProcessing's "single": special tokens around the sequence $A.
absl::StatusOr<SpecialTokenTemplate> ParseTemplate(const Json& node, const std::string& field,
                                                   int32_t vocab_size) {
  auto single = node.find("single");
  if (single == node.end() || !single->is_array()) return Bad(field + ".single", "expected an array");
  SpecialTokenTemplate out;
  bool seen_text = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& piece = (*single)[i];
    const std::string piece_field = absl::StrCat(field, ".single[", i, "]");
    if (piece.is_object() && piece.contains("Sequence")) {
      const std::string* id = StringAt(piece["Sequence"], "id");
      if (id == nullptr || *id != "A" || seen_text) {
        return Bad(piece_field, "expected the text, sequence \"A\", exactly once");
      }
      seen_text = true;
      continue;
    }
    const std::string* name = piece.is_object() && piece.contains("SpecialToken")
                                  ? StringAt(piece["SpecialToken"], "id")
                                  : nullptr;
    if (name == nullptr) {
      return Bad(piece_field, "expected {\"SpecialToken\": {\"id\": ...}} or {\"Sequence\": {\"id\": \"A\"}}");
    }
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, SpecialTokenIds(node, field, *name, vocab_size));
    std::vector<int32_t>& side = seen_text ? out.suffix : out.prefix;
    side.insert(side.end(), ids.begin(), ids.end());
  }
  if (!seen_text) return Bad(field + ".single", "has no sequence \"A\" (the text)");
  return out;
}

absl::StatusOr<SpecialTokenTemplate> Parse(const Json& node, const std::string& field,
                                           int32_t vocab_size) {
  if (node.is_null()) return SpecialTokenTemplate{};
  const std::string* type = StringAt(node, "type");
  if (type == nullptr) return Bad(field + ".type", "expected a string");
  if (*type == "ByteLevel") return SpecialTokenTemplate{};  // offsets only
  if (*type == "TemplateProcessing") return ParseTemplate(node, field, vocab_size);
  if (*type != "Sequence") {
    return Bad(field + ".type", absl::StrCat("\"", *type, "\" is not supported (supported: ByteLevel, "
                                             "TemplateProcessing, Sequence)"));
  }
  auto list = node.find("processors");
  if (list == node.end() || !list->is_array()) return Bad(field + ".processors", "expected an array");
  // Each processor wraps what the ones before it produced.
  SpecialTokenTemplate out;
  for (size_t i = 0; i < list->size(); ++i) {
    ASSIGN_OR_RETURN(SpecialTokenTemplate inner,
                     Parse((*list)[i], absl::StrCat(field, ".processors[", i, "]"), vocab_size));
    out.prefix.insert(out.prefix.begin(), inner.prefix.begin(), inner.prefix.end());
    out.suffix.insert(out.suffix.end(), inner.suffix.begin(), inner.suffix.end());
  }
  return out;
}

// A boolean key of tokenizer_config.json; absent or null: `fallback`.
absl::StatusOr<bool> Flag(const Json& config, const char* key, bool fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return Bad(key, absl::StrCat("expected true or false, got ", it->dump()));
  return it->get<bool>();
}

// The id of bos_token or eos_token: a string, or an AddedToken object's "content".
absl::StatusOr<int32_t> TokenField(const Json& config, const char* key,
                                   absl::FunctionRef<std::optional<int32_t>(std::string_view)> token_id) {
  auto it = config.find(key);
  const std::string* content = nullptr;
  if (it != config.end()) content = it->is_string() ? it->get_ptr<const std::string*>() : StringAt(*it, "content");
  if (content == nullptr) {
    return Bad(key, "expected a token (a string or {\"content\": ...}); the tokenizer class adds it");
  }
  std::optional<int32_t> id = token_id(*content);
  if (!id) return Bad(key, absl::StrCat(Json(*content).dump(), " is not an added token of tokenizer.json"));
  return *id;
}

}  // namespace

absl::StatusOr<SpecialTokenTemplate> ParsePostProcessor(const Json& node, int32_t vocab_size) {
  return Parse(node, "post_processor", vocab_size);
}

absl::StatusOr<std::optional<SpecialTokenTemplate>> ParseLlamaSpecialTokens(
    const Json& config, absl::FunctionRef<std::optional<int32_t>(std::string_view)> token_id) {
  if (!config.is_object()) return Bad("(document)", "expected a JSON object");
  const std::string* cls = StringAt(config, "tokenizer_class");
  if (cls == nullptr || (*cls != "LlamaTokenizerFast" && *cls != "LlamaTokenizer")) return std::nullopt;
  ASSIGN_OR_RETURN(const bool add_bos, Flag(config, "add_bos_token", true));
  ASSIGN_OR_RETURN(const bool add_eos, Flag(config, "add_eos_token", false));
  SpecialTokenTemplate out;
  if (add_bos) {
    ASSIGN_OR_RETURN(const int32_t bos, TokenField(config, "bos_token", token_id));
    out.prefix.push_back(bos);
  }
  if (add_eos) {
    ASSIGN_OR_RETURN(const int32_t eos, TokenField(config, "eos_token", token_id));
    out.suffix.push_back(eos);
  }
  return out;
}

}  // namespace joule::tokenizer::internal
