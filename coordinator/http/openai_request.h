// Request bodies of POST /v1/completions and /v1/chat/completions, parsed and
// checked field by field. No tokenizer and no network here: the result still
// holds text (prompt or chat messages); openai_service.cc turns it into token ids.
//
// As OpenAI's server does, unknown fields are ignored and null means "absent";
// a known field with the wrong type or an out-of-range value is
// InvalidArgument with the field attached as `param` (api_error.h).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer/chat_template.h"
#include "scheduler/tier.h"

namespace joule::http {

enum class Endpoint { kCompletions, kChatCompletions };

// OpenAI allows at most this many stop strings.
inline constexpr int kMaxStopStrings = 4;

struct CompletionRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;

  // Completions: a text prompt, or token ids (prompt_is_tokens).
  std::string prompt_text;
  std::vector<int32_t> prompt_token_ids;
  bool prompt_is_tokens = false;
  // Chat: the conversation ("developer" is already mapped to "system").
  std::vector<tokenizer::ChatMessage> messages;

  // max_tokens, or for chat max_completion_tokens (which wins); absent: the
  // endpoint's default (openai_service.h).
  std::optional<int64_t> max_tokens;
  double temperature = 1.0;  // OpenAI's default
  double top_p = 1.0;
  int32_t top_k = 0;  // 0 (or -1) disables it
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;  // vLLM's extension: generate past end-of-sequence tokens
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  scheduler::Tier tier = scheduler::Tier::kStandard;
  std::string user;
};

// Parses a request body. Errors: malformed JSON or a body that is not a JSON
// object (param null), missing `model`/`prompt`/`messages`, wrong types and
// out-of-range values (param = the field, e.g. "temperature",
// "messages[1].content").
absl::StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body, Endpoint endpoint);

}  // namespace joule::http
