// The OpenAI-compatible API on top of HttpServer: routes, API key, request
// parsing, tokenization, per-tier admission, generation through a
// GenerationBackend, and the answer as one JSON response or a stream of
// server-sent events. Also /health, /ready and /metrics.
//
//   GET  /v1/models, /v1/models/ID      POST /v1/completions, /v1/chat/completions
//   GET  /health (the process serves)   GET /ready (a request could be routed now)
//   GET  /metrics (Prometheus text)
//
// Every admitted request ends exactly once: finished (stop/length), cancelled
// because its client went away (the worker call is cancelled and its KV blocks
// freed), or an error in OpenAI's shape (api_error.h). See docs/api.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/cluster/clock.h"
#include "coordinator/cluster/coordinator_options.h"
#include "coordinator/http/generation_backend.h"
#include "coordinator/http/http_metrics.h"
#include "coordinator/http/http_server.h"
#include "coordinator/http/openai_request.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "prometheus/collectable.h"
#include "prometheus/registry.h"

namespace joule::http {

struct OpenAiServiceOptions {
  std::string model_name;    // the served model id
  int64_t max_context = 0;   // prompt + completion tokens at most
  // Keys accepted as 'Authorization: Bearer KEY' on /v1 routes; empty: no authentication.
  std::vector<std::string> api_keys;
  bool metrics_require_key = false;  // /metrics needs a key too (when keys are set)
  cluster::TierCaps tier_caps = {64, 256, 1024, 4096};
  // max_tokens of a completion that sets none (OpenAI's legacy default);
  // chat completions default to the rest of the context.
  int64_t default_completion_tokens = 16;
  // What one request may ask for (n, best_of, logprobs, prompts, logit_bias).
  RequestLimits limits;
  // Token ids a request may name (logit_bias): the model's embedding rows;
  // 0: the tokenizer's vocabulary.
  int64_t vocab_size = 0;
  // How chat messages become the prompt (the model family's template); the
  // coordinator checks at start-up that the tokenizer has its markers.
  tokenizer::ChatFormat chat_format = tokenizer::ChatFormat::kChatMl;
  // More metric sources /metrics serves after the registry (the scheduler's).
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables;
};

class OpenAiService final : public HttpHandler {
 public:
  // Everything passed in must outlive the service. Metrics are registered in `registry`,
  // which /metrics serves.
  OpenAiService(OpenAiServiceOptions options, const tokenizer::Tokenizer* tokenizer,
                GenerationBackend* backend, std::shared_ptr<prometheus::Registry> registry,
                const cluster::Clock* clock);

  void Handle(HttpRequest request, std::shared_ptr<Exchange> exchange) override;
  HttpResponse ErrorResponse(int http_status, const std::string& message) override;

  // Requests admitted and not yet ended, per tier (what --tier-queue-cap bounds).
  int InFlight(scheduler::Tier tier) const { return in_flight_[static_cast<size_t>(tier)].load(); }

 private:
  friend class Generation;

  // A generation request turned into what the backend takes: one
  // GenerateRequest per prompt and generation (prompt-major: prompt p's
  // best_of generations are p * best_of ...), request ids still unset.
  struct Prepared {
    struct PromptInput {
      std::vector<int32_t> ids;
      std::string echo_text;  // what echo puts first: the prompt as the client wrote it
    };
    CompletionRequest request;
    std::vector<PromptInput> prompts;
    std::vector<v1::GenerateRequest> generates;
    int64_t prompt_tokens = 0;  // over the prompts, each once
  };

  void HandleCompletion(const HttpRequest& request, Endpoint endpoint, std::shared_ptr<Exchange> exchange,
                        absl::Time arrival);
  absl::StatusOr<Prepared> Prepare(std::string_view body, Endpoint endpoint) const;
  // max_tokens of one prompt's generations: the request's, or the default
  // within the context; 400 context_length_exceeded naming `prompt_param`.
  absl::StatusOr<int64_t> MaxTokens(const CompletionRequest& r, Endpoint endpoint, int64_t prompt_tokens,
                                    const std::string& prompt_param) const;
  absl::StatusOr<std::vector<int32_t>> PromptTokens(const CompletionRequest& request, size_t prompt) const;
  bool Authorized(const HttpRequest& request) const;
  bool TryAdmit(scheduler::Tier tier);
  void Release(scheduler::Tier tier);
  std::string NewId(Endpoint endpoint);

  // Sends an error response and counts it.
  void RespondError(Exchange& exchange, std::string_view route, const absl::Status& status,
                    std::string_view tier = "");

  const OpenAiServiceOptions options_;
  const tokenizer::Tokenizer* const tokenizer_;
  GenerationBackend* const backend_;
  const std::shared_ptr<prometheus::Registry> registry_;
  const cluster::Clock* const clock_;
  HttpMetrics metrics_;
  const int64_t started_;  // Unix seconds, the model's "created"
  std::vector<int32_t> chat_stop_ids_;  // the chat format's end of turn (tokenizer::ChatStopTokenIds)
  std::array<std::atomic<int>, std::size(scheduler::kAllTiers)> in_flight_{};
};

}  // namespace joule::http
