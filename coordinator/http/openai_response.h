// Response bodies of the OpenAI-compatible API: whole responses, server-sent
// event chunks of a streamed one, and the model list. Pure functions of their
// arguments (no clock, no ids made up here), so tests pin them exactly.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "coordinator/http/openai_request.h"
#include "scheduler/tier.h"

namespace joule::http {

// What every response and chunk of one request repeats.
struct ResponseHeader {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string id;        // "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;   // Unix seconds
  std::string model;
  scheduler::Tier tier = scheduler::Tier::kStandard;
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  // Joule's extension: the serving rank's metered energy charged to the
  // request, and how it was measured (nvml, rapl, or model = an estimate).
  // Absent when the worker reported none (no meter, or stopped by a stop string).
  // When the worker that served it died, the energy is the last rank's only.
  std::optional<double> energy_joules;
  std::string energy_source;
  // Joule's extension, present when > 0: completion tokens a live rank had to
  // recompute after the rank serving the request died (they count once in
  // completion_tokens; this is the extra work).
  int64_t resumed_tokens = 0;
  // prompt_tokens_details.cached_tokens, always present (OpenAI's field):
  // prompt tokens the serving rank's prefix cache held.
  int64_t cached_tokens = 0;
};

// A likely alternative at one position (top_logprobs).
struct TopLogprob {
  std::string token;  // as shown (TokenDisplayText)
  std::string bytes;  // the token's raw bytes
  double logprob = 0;
};

// One token's log probability as the API shows it.
struct TokenLogprobEntry {
  std::string token;  // as shown (TokenDisplayText)
  std::string bytes;  // the token's raw bytes
  // Absent for the first token of an echoed prompt (nothing predicts it):
  // null in token_logprobs and top_logprobs.
  std::optional<double> logprob;
  std::vector<TopLogprob> top;  // most likely first
  int64_t text_offset = 0;      // completions: code points of the choice's text before the token
};

// One choice of a non-streamed response.
struct ChoiceResult {
  int index = 0;
  std::string text;
  std::string finish_reason;
  // With logprobs asked for: an object (chat: {content, refusal}; completions:
  // {tokens, token_logprobs, top_logprobs, text_offset}) of these; else null.
  bool has_logprobs = false;
  std::vector<TokenLogprobEntry> logprobs;
};

// A non-streamed response: object "text_completion" with choices[i].text, or
// "chat.completion" with choices[i].message {role: assistant, content}.
std::string CompletionJson(const ResponseHeader& header, const std::vector<ChoiceResult>& choices,
                           const Usage& usage);

// One streamed chunk ("text_completion" / "chat.completion.chunk") with one
// choice, `index`. Chat: `role_only` makes the opening delta {"role":"assistant","content":""};
// a chunk with a finish reason carries delta {} plus any remaining text.
// `usage_null` adds "usage": null (stream_options.include_usage asks for it on
// every chunk but the last). `logprobs` non-null: the log probabilities of the
// chunk's tokens (possibly none, e.g. for a special token).
struct ChunkFields {
  int index = 0;
  std::string_view text;
  std::string_view finish_reason;  // empty: null
  bool role_only = false;
  bool usage_null = false;
  const std::vector<TokenLogprobEntry>* logprobs = nullptr;
};
std::string ChunkJson(const ResponseHeader& header, const ChunkFields& fields);

// The final chunk of stream_options.include_usage: empty choices, usage.
std::string UsageChunkJson(const ResponseHeader& header, const Usage& usage);

// "data: JSON\n\n"; and the stream's terminal event.
std::string SseEvent(std::string_view json);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// GET /v1/models (a list) and GET /v1/models/ID (one model).
std::string ModelJson(std::string_view name, int64_t created, int64_t max_context);
std::string ModelListJson(std::string_view name, int64_t created, int64_t max_context);

}  // namespace joule::http
