// The OpenAI request decoder (coordinator/http/openai_request.h) on any bytes,
// as both endpoints. A request it accepts must keep the bounds the decoder
// promises (the rest of the front door relies on them), and its chat messages
// must render as the front door renders them (ChatML).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "coordinator/http/openai_request.h"
#include "coordinator/tokenizer/chat_template.h"
#include "tests/fuzz/fuzz_check.h"

namespace joule::fuzz {
namespace {

void CheckAccepted(const http::CompletionRequest& r, http::Endpoint endpoint) {
  FUZZ_CHECK(r.endpoint == endpoint, "endpoint changed");
  if (r.max_tokens) FUZZ_CHECK(*r.max_tokens >= 1, "max_tokens %lld", static_cast<long long>(*r.max_tokens));
  FUZZ_CHECK(r.temperature >= 0 && r.temperature <= 2, "temperature %g", r.temperature);
  FUZZ_CHECK(r.top_p > 0 && r.top_p <= 1, "top_p %g", r.top_p);
  FUZZ_CHECK(r.top_k >= 0, "top_k %d", r.top_k);
  FUZZ_CHECK(static_cast<int>(r.stop.size()) <= http::kMaxStopStrings, "%zu stop strings", r.stop.size());
  for (const std::string& s : r.stop) FUZZ_CHECK(!s.empty(), "empty stop string");
  FUZZ_CHECK(!r.include_usage || r.stream, "include_usage without stream");
  if (endpoint == http::Endpoint::kChatCompletions) {
    FUZZ_CHECK(!r.messages.empty(), "chat request without messages");
    for (const tokenizer::ChatMessage& m : r.messages) {
      FUZZ_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", "role '%s'", m.role.c_str());
    }
    absl::StatusOr<std::string> prompt = tokenizer::RenderChatMl(r.messages, /*add_generation_prompt=*/true);
    FUZZ_CHECK(prompt.ok(), "accepted messages do not render: %s", prompt.status().ToString().c_str());
  } else {
    FUZZ_CHECK(r.messages.empty(), "completion request with messages");
    FUZZ_CHECK(!r.prompts.empty(), "completion request without a prompt");
    for (const http::Prompt& p : r.prompts) {
      if (p.is_tokens) {
        for (int32_t id : p.token_ids) FUZZ_CHECK(id >= 0, "token id %d", id);
      } else {
        FUZZ_CHECK(p.token_ids.empty(), "text prompt with token ids");
      }
    }
  }
  const http::RequestLimits limits;
  FUZZ_CHECK(r.n >= 1 && r.n <= limits.max_n, "n %d", r.n);
  FUZZ_CHECK(r.best_of >= r.n && r.best_of <= limits.max_best_of, "best_of %d (n %d)", r.best_of, r.n);
  FUZZ_CHECK(static_cast<int>(r.prompts.size()) <= limits.max_prompts, "%zu prompts", r.prompts.size());
  FUZZ_CHECK(std::max<int64_t>(1, r.prompts.size()) * r.best_of <= limits.max_generations, "too many generations");
  FUZZ_CHECK(r.top_logprobs >= 0 && r.top_logprobs <= limits.max_logprobs, "top_logprobs %d", r.top_logprobs);
  FUZZ_CHECK(r.logprobs || r.top_logprobs == 0, "top_logprobs without logprobs");
  FUZZ_CHECK(r.presence_penalty >= -2 && r.presence_penalty <= 2, "presence_penalty %g", r.presence_penalty);
  FUZZ_CHECK(r.frequency_penalty >= -2 && r.frequency_penalty <= 2, "frequency_penalty %g", r.frequency_penalty);
  FUZZ_CHECK(r.repetition_penalty > 0, "repetition_penalty %g", r.repetition_penalty);
  FUZZ_CHECK(static_cast<int>(r.logit_bias.size()) <= limits.max_logit_bias, "%zu logit_bias entries",
             r.logit_bias.size());
  for (const auto& [id, bias] : r.logit_bias) {
    FUZZ_CHECK(id >= 0 && bias >= -100 && bias <= 100, "logit_bias %d: %g", id, bias);
  }
}

}  // namespace
}  // namespace joule::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using joule::http::Endpoint;
  const std::string_view body = joule::fuzz::Text(data, size);
  for (Endpoint endpoint : {Endpoint::kCompletions, Endpoint::kChatCompletions}) {
    absl::StatusOr<joule::http::CompletionRequest> r = joule::http::ParseCompletionRequest(body, endpoint);
    if (r.ok()) {
      joule::fuzz::CheckAccepted(*r, endpoint);
    } else {
      FUZZ_CHECK(r.status().code() == absl::StatusCode::kInvalidArgument && !r.status().message().empty(),
                 "refused without a clear error: %s", r.status().ToString().c_str());
    }
  }
  return 0;
}
