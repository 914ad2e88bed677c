// The special tokens Hugging Face adds around one text when it encodes with
// add_special_tokens=True: tokenizer.json's post_processor, or, for a Llama
// tokenizer class, the one transformers writes in its place from
// tokenizer_config.json (LlamaTokenizerFast.update_post_processor). DeepSeek-V3
// takes the second way: its post_processor is ByteLevel, which adds nothing,
// and its tokenizer_config.json says LlamaTokenizerFast with add_bos_token.
// Internal to joule_tokenizer.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace joule::tokenizer::internal {

struct SpecialTokenTemplate {
  std::vector<int32_t> prefix;  // ids before the text (a BOS)
  std::vector<int32_t> suffix;  // ids after it (an EOS)
};

// tokenizer.json's "post_processor": null or ByteLevel (nothing added),
// TemplateProcessing (its "single" template; pair templates are never used
// here), or a Sequence of those. Ids must lie in [0, vocab_size). Other types
// (BertProcessing, RobertaProcessing) are refused; errors name the field.
absl::StatusOr<SpecialTokenTemplate> ParsePostProcessor(const nlohmann::json& node,
                                                        int32_t vocab_size);

// The template transformers builds from tokenizer_config.json for
// tokenizer_class LlamaTokenizerFast (or LlamaTokenizer): bos_token when
// add_bos_token (default true), eos_token when add_eos_token (default false).
// nullopt for other classes, whose tokenizer.json post_processor stands.
// `token_id` gives the id of an added token's content; errors name the field.
absl::StatusOr<std::optional<SpecialTokenTemplate>> ParseLlamaSpecialTokens(
    const nlohmann::json& config,
    absl::FunctionRef<std::optional<int32_t>(std::string_view)> token_id);

}  // namespace joule::tokenizer::internal
