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
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer/chat_template.h"
#include "scheduler/tier.h"

namespace joule::http {

enum class Endpoint { kCompletions, kChatCompletions };

// OpenAI allows at most this many stop strings.
inline constexpr int kMaxStopStrings = 4;

// What one request may ask for at most (coordinator flags, docs/api.md); a
// value beyond a limit is a 400 naming the field.
struct RequestLimits {
  int max_n = 16;                    // n
  int max_best_of = 16;              // best_of
  int max_logprobs = 20;             // top_logprobs (chat), logprobs (completions)
  int max_prompts = 16;              // prompts in one completions request
  int max_logit_bias = 300;          // logit_bias entries (OpenAI's limit)
  int max_generations = 64;          // prompts x max(n, best_of): generations one request fans out to
};

// One completions prompt: text, or token ids (is_tokens).
struct Prompt {
  std::string text;
  std::vector<int32_t> token_ids;
  bool is_tokens = false;
};

struct CompletionRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;

  // Completions: one or more prompts ("prompt": a string, token ids, or an
  // array of either). Errors about one of several prompts name "prompt[i]".
  std::vector<Prompt> prompts;
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
  // Choices per prompt, and (completions) generations per prompt that the n
  // with the highest cumulative log probability are chosen from (best_of >= n;
  // equal to n when absent).
  int n = 1;
  int best_of = 1;
  // Log probabilities of the output tokens (chat: "logprobs": true;
  // completions: "logprobs": N), with top_logprobs alternatives each (chat:
  // "top_logprobs"; completions: N). echo (completions): the prompt comes
  // first in the text, and with logprobs, its tokens' log probabilities.
  bool logprobs = false;
  int top_logprobs = 0;
  bool echo = false;
  // OpenAI's penalties ([-2, 2]) and vLLM's repetition_penalty (> 0; 1: off).
  double presence_penalty = 0;
  double frequency_penalty = 0;
  double repetition_penalty = 1;
  // logit_bias: token id -> bias in [-100, 100], by id. Ids are checked
  // against the vocabulary by the service, which knows it.
  std::vector<std::pair<int32_t, double>> logit_bias;
  bool ignore_eos = false;  // vLLM's extension: generate past end-of-sequence tokens
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  scheduler::Tier tier = scheduler::Tier::kStandard;
  std::string user;
};

// Parses a request body. Errors: malformed JSON or a body that is not a JSON
// object (param null), missing `model`/`prompt`/`messages`, wrong types and
// out-of-range values, including values beyond `limits` (param = the field,
// e.g. "temperature", "messages[1].content", "top_logprobs").
absl::StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body, Endpoint endpoint,
                                                         const RequestLimits& limits = {});

}  // namespace joule::http
