// The text stages of a Hugging Face tokenizer.json before BPE: the normalizer
// and the pre-tokenizer (which cuts text into words). Internal to
// joule_tokenizer; ICU does the Unicode work (NFC, regexes with \p{L} and
// lookahead).
//
// Supported: what Qwen2/Qwen3 and DeepSeek-V3 ship. normalizer: null, NFC, or a
// Sequence of those. pre_tokenizer: ByteLevel (add_prefix_space, use_regex with
// GPT-2's pattern), Split (Regex or String pattern, behavior Isolated or
// Removed, invert), or a Sequence of those. Anything else is refused by Parse
// with an error naming the field.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace joule::tokenizer::internal {

class Normalizer {
 public:
  // `node` is the "normalizer" field; errors name `field`.
  static absl::StatusOr<Normalizer> Parse(const nlohmann::json& node, const std::string& field);

  bool is_identity() const { return !nfc_; }

  // Normalized form of `text` (well-formed UTF-8) in *out.
  absl::Status Apply(std::string_view text, std::string* out) const;

 private:
  bool nfc_ = false;
};

class PreTokenizer {
 public:
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;

  // `node` is the "pre_tokenizer" field. It must contain a ByteLevel step: only
  // byte-level vocabularies are supported.
  static absl::StatusOr<PreTokenizer> Parse(const nlohmann::json& node);

  // Cuts `text` (well-formed UTF-8) into words and calls `emit` with each, in
  // order. The views are valid during the call only.
  absl::Status Split(std::string_view text,
                     absl::FunctionRef<void(std::string_view word)> emit) const;

  // True when the words always concatenate back to the input: no step removes
  // text or adds a prefix space.
  bool preserves_text() const;

 private:
  struct Step;
  PreTokenizer();
  std::vector<Step> steps_;
};

}  // namespace joule::tokenizer::internal
