#include "coordinator/http/openai_service.h"

#include <algorithm>
#include <iterator>
#include <sstream>
#include <utility>

#include <boost/beast/http/field.hpp>
#include <boost/beast/http/status.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/secrets.h"
#include "common/status.h"
#include "coordinator/http/api_error.h"
#include "coordinator/http/choice_stream.h"
#include "coordinator/http/openai_response.h"
#include "coordinator/http/text_stream.h"
#include "coordinator/tokenizer/chat_template.h"
#include "prometheus/text_serializer.h"

namespace joule::http {
namespace bhttp = boost::beast::http;

namespace {

// Route labels for metrics: the fixed routes, so clients cannot grow the label set.
constexpr std::string_view kRouteModels = "/v1/models";
constexpr std::string_view kRouteCompletions = "/v1/completions";
constexpr std::string_view kRouteChat = "/v1/chat/completions";
constexpr std::string_view kRouteOther = "other";

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }
std::string_view StdView(boost::beast::string_view s) { return std::string_view(s.data(), s.size()); }

HttpResponse JsonResponse(int status, std::string body) {
  HttpResponse r(static_cast<bhttp::status>(status), 11);
  r.set(bhttp::field::content_type, "application/json");
  r.body() = std::move(body);
  return r;
}

HttpResponse ApiErrorResponse(const absl::Status& status) {
  const ApiError e = ToApiError(status);
  HttpResponse r = JsonResponse(e.http_status, ErrorJson(e));
  if (e.http_status == 429) r.set(bhttp::field::retry_after, "1");
  return r;
}

std::string_view RouteLabel(Endpoint e) { return e == Endpoint::kChatCompletions ? kRouteChat : kRouteCompletions; }

// Router::Validate names proto fields ("sampling.top_p: ..."); clients know
// the API's names.
absl::Status ToApiFields(const absl::Status& status, Endpoint endpoint, std::string_view prompt) {
  if (status.code() != absl::StatusCode::kInvalidArgument) return status;
  const std::string_view msg(status.message().data(), status.message().size());
  const bool chat = endpoint == Endpoint::kChatCompletions;
  struct Mapping {
    std::string_view proto_field;
    std::string_view param;
  };
  const Mapping mappings[] = {{"prompt_token_ids", prompt},       {"sampling.max_tokens", "max_tokens"},
                              {"sampling.temperature", "temperature"}, {"sampling.top_p", "top_p"},
                              {"sampling.top_k", "top_k"},         {"sampling.stop_token_ids", "stop"},
                              {"sampling.presence_penalty", "presence_penalty"},
                              {"sampling.frequency_penalty", "frequency_penalty"},
                              {"sampling.repetition_penalty", "repetition_penalty"},
                              {"sampling.logit_bias", "logit_bias"},
                              {"sampling.top_logprobs", chat ? "top_logprobs" : "logprobs"},
                              {"service_tier", "service_tier"}};
  for (const Mapping& m : mappings) {
    if (!absl::StartsWith(AbslView(msg), AbslView(m.proto_field))) continue;
    std::string_view rest = msg.substr(m.proto_field.size());
    std::string text = absl::StrCat(AbslView(m.param), AbslView(rest));
    absl::Status out = WithParam(absl::InvalidArgumentError(text), m.param);
    if (m.param == "max_tokens" && absl::StrContains(AbslView(msg), "context")) {
      out = WithErrorCode(WithParam(std::move(out), prompt), "context_length_exceeded");
    }
    return out;
  }
  return status;
}

}  // namespace

// One admitted completion request, from GenerateAsync to its one terminal
// answer. It fans out to one worker generation per prompt and choice (n, or
// best_of); each becomes a ChoiceStream. Responses arrive on gRPC's threads
// (one at a time per generation, generations concurrently), the client's
// departure on the connection's strand; mu_ orders them. The answer goes out
// once every generation has finished; the first that fails fails the whole
// request and cancels the others.
class Generation : public std::enable_shared_from_this<Generation> {
 public:
  // `generates`: the worker requests, one per generation (prompt-major), ids set.
  Generation(OpenAiService* service, OpenAiService::Prepared prepared,
             const std::vector<v1::GenerateRequest>& generates, ResponseHeader header,
             std::shared_ptr<Exchange> exchange, absl::Time arrival)
      : service_(service),
        request_(std::move(prepared.request)),
        prompts_(std::move(prepared.prompts)),
        prompt_tokens_(prepared.prompt_tokens),
        header_(std::move(header)),
        exchange_(std::move(exchange)),
        arrival_(arrival),
        worker_logprobs_(!generates.empty() && generates[0].sampling().logprobs()) {
    subs_.reserve(generates.size());
    for (size_t k = 0; k < generates.size(); ++k) {
      const int prompt = static_cast<int>(k) / request_.best_of;
      const int choice = static_cast<int>(k) % request_.best_of;
      subs_.emplace_back(generates[k].request_id(), prompt, choice,
                         ChoiceStream(*service->tokenizer_,
                                      {.stop = request_.stop,
                                       .logprobs = request_.logprobs,
                                       .legacy = header_.endpoint == Endpoint::kCompletions}));
    }
  }

  // The client is gone or the request failed: a generation still queued or
  // running should stop.
  bool client_gone() const { return gone_.load() || failed_.load(); }

  // A worker response of generation `k`. False once the client is gone, the
  // request failed or a stop string ended the text: the Router then cancels
  // that worker call.
  bool OnResponse(size_t k, const v1::GenerateResponse& response) {
    std::vector<std::string> cancel;
    bool more;
    {
      absl::MutexLock lock(&mu_);
      more = OnResponseLocked(k, response, &cancel);
    }
    CancelAll(cancel);
    return more;
  }

  // The backend's outcome of generation `k`; runs once per generation, after
  // its last OnResponse (or instead of a launch that no longer makes sense).
  void OnDone(size_t k, const absl::Status& status) {
    std::vector<std::string> cancel;
    bool all_done;
    {
      absl::MutexLock lock(&mu_);
      Sub& sub = subs_[k];
      sub.done = true;
      ++done_;
      if (!finished_ && !gone_ && sub.finish_reason.empty()) {
        FailLocked(status.ok() ? absl::InternalError("the worker ended the request without a finish reason")
                               : status,
                   sub, &cancel);
      }
      all_done = done_ == subs_.size();
      if (all_done && gone_ && !finished_) {
        service_->metrics_.CountRequest(RouteLabel(header_.endpoint), 499, TierLabel());
      }
    }
    CancelAll(cancel);
    if (all_done) service_->Release(header_.tier);
  }

  // The connection closed before the answer was complete.
  void OnClientGone() {
    std::vector<std::string> cancel;
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || gone_) return;
      gone_ = true;
      for (const Sub& sub : subs_) {
        if (!sub.done) cancel.push_back(sub.request_id);
      }
    }
    // Outside mu_: the backend may finish the calls (and run OnDone) right here.
    CancelAll(cancel);
  }

 private:
  // One worker generation: choice `choice` (of best_of) of prompt `prompt`.
  struct Sub {
    Sub(std::string id, int prompt_index, int choice_index, ChoiceStream choice_stream)
        : request_id(std::move(id)), prompt(prompt_index), choice(choice_index), stream(std::move(choice_stream)) {}
    std::string request_id;
    int prompt = 0;
    int choice = 0;
    ChoiceStream stream;
    bool echoed = false;
    ChoiceResult result;  // non-streamed: the text and entries so far
    int64_t completion_tokens = 0;
    int64_t cached_tokens = 0;
    int64_t resumed_tokens = 0;
    std::optional<double> energy_joules;
    std::string energy_source;
    absl::Time last_token;
    std::string finish_reason;  // set once it finished
    bool done = false;          // the backend reported its outcome
  };

  std::string_view TierLabel() const { return scheduler::TierName(header_.tier); }
  // The choice index a generation streams under (streams have best_of == n).
  int StreamIndex(const Sub& sub) const { return sub.prompt * request_.n + sub.choice; }
  std::string_view PromptParam(const Sub& sub) const {
    if (header_.endpoint == Endpoint::kChatCompletions) return "messages";
    return prompts_.size() > 1 ? prompt_params_[sub.prompt] : std::string_view("prompt");
  }

  void CancelAll(const std::vector<std::string>& ids) {
    for (const std::string& id : ids) service_->backend_->Cancel(id);
  }

  bool OnResponseLocked(size_t k, const v1::GenerateResponse& response, std::vector<std::string>* cancel)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Sub& sub = subs_[k];
    if (finished_ || gone_ || !sub.finish_reason.empty()) return false;
    if (worker_logprobs_ && response.logprobs_size() != response.token_ids_size()) {
      FailLocked(absl::InternalError(absl::StrCat("rank ", response.rank(), " sent ", response.logprobs_size(),
                                                  " log probabilities for ", response.token_ids_size(),
                                                  " tokens of ", sub.request_id)),
                 sub, cancel);
      return false;
    }
    const absl::Time now = service_->clock_->Now();
    HttpMetrics& m = service_->metrics_;
    std::string out;
    ChoiceStream::Delta pending;  // the echoed prompt goes out with the first token
    if (request_.echo && !sub.echoed &&
        (response.token_ids_size() > 0 || response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED)) {
      sub.echoed = true;
      const OpenAiService::Prepared::PromptInput& prompt = prompts_[sub.prompt];
      sub.stream.Echo(prompt.echo_text, prompt.ids, response.prompt_logprobs(), &pending);
    }
    for (int i = 0; i < response.token_ids_size(); ++i) {
      ++sub.completion_tokens;
      m.generation_tokens(header_.tier).Increment();
      if (!first_token_seen_) {
        first_token_seen_ = true;
        m.ttft(header_.tier).Observe(absl::ToDoubleSeconds(now - arrival_));
      } else if (sub.completion_tokens > 1) {
        m.itl(header_.tier).Observe(absl::ToDoubleSeconds(now - sub.last_token));
      }
      sub.last_token = now;
      ChoiceStream::Delta delta = std::exchange(pending, {});
      sub.stream.Push(response.token_ids(i), worker_logprobs_ ? &response.logprobs(i) : nullptr, &delta);
      if (request_.stream) {
        StartStreamLocked(&out);
        out += SseEvent(ChunkJson(header_, {.index = StreamIndex(sub),
                                            .text = delta.text,
                                            .usage_null = request_.include_usage,
                                            .logprobs = request_.logprobs ? &delta.logprobs : nullptr}));
      } else {
        Append(std::move(delta), &sub.result);
      }
      if (sub.stream.stopped()) break;
    }
    if (sub.stream.stopped()) {
      FinishSubLocked(sub, "stop", std::move(pending), &out);
    } else if (response.finish_reason() == v1::FINISH_REASON_CANCELLED) {
      // Someone ended it early (not this client, who would be gone): not a
      // normal finish, whatever was streamed so far.
      if (!out.empty()) exchange_->Send(std::move(out));
      FailLocked(absl::CancelledError(absl::StrCat("request ", sub.request_id, " was cancelled on rank ",
                                                   response.rank(), " before it finished")),
                 sub, cancel);
      return false;
    } else if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      sub.resumed_tokens = response.resumed_tokens();
      sub.cached_tokens = response.cached_tokens();
      m.cached_prompt_tokens(header_.tier).Increment(static_cast<double>(response.cached_tokens()));
      if (!response.energy_source().empty()) {
        sub.energy_joules = response.energy_joules();
        sub.energy_source = response.energy_source();
        m.AddRequestEnergy(header_.tier, response.energy_joules(), sub.completion_tokens);
      }
      pending.text += sub.stream.Flush();
      const bool stop = sub.stream.stopped() || response.finish_reason() == v1::FINISH_REASON_STOP;
      FinishSubLocked(sub, stop ? "stop" : "length", std::move(pending), &out);
    }
    if (finished_subs_ == subs_.size()) FinishLocked(&out);
    if (!out.empty()) exchange_->Send(std::move(out));
    if (finished_ && request_.stream) exchange_->EndStream();
    // After a stop string the worker would go on generating: have it stop.
    return !sub.stream.stopped();
  }

  static void Append(ChoiceStream::Delta delta, ChoiceResult* result) {
    result->text += delta.text;
    for (TokenLogprobEntry& e : delta.logprobs) result->logprobs.push_back(std::move(e));
  }

  // The status line goes out with the first token, so that errors before it
  // (no worker ready, validation) still get their own HTTP status.
  void StartStreamLocked(std::string* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (stream_started_) return;
    stream_started_ = true;
    HttpStreamHeader h(bhttp::status::ok, 11);
    h.set(bhttp::field::content_type, "text/event-stream");
    h.set(bhttp::field::cache_control, "no-cache");
    exchange_->StartStream(std::move(h));
    service_->metrics_.CountRequest(RouteLabel(header_.endpoint), 200, TierLabel());
    if (header_.endpoint == Endpoint::kChatCompletions) {
      for (const Sub& sub : subs_) {
        *out += SseEvent(ChunkJson(
            header_, {.index = StreamIndex(sub), .role_only = true, .usage_null = request_.include_usage}));
      }
    }
  }

  // Generation `sub` ended with `reason`; `tail` is its text still held back.
  void FinishSubLocked(Sub& sub, std::string_view reason, ChoiceStream::Delta tail, std::string* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    sub.finish_reason = std::string(reason);
    ++finished_subs_;
    if (!request_.stream) {
      Append(std::move(tail), &sub.result);
      return;
    }
    StartStreamLocked(out);
    *out += SseEvent(ChunkJson(
        header_, {.index = StreamIndex(sub),
                  .text = tail.text,
                  .finish_reason = reason,
                  .usage_null = request_.include_usage,
                  .logprobs = request_.logprobs && !tail.logprobs.empty() ? &tail.logprobs : nullptr}));
  }

  // Usage over every generation; each prompt counts once. A prompt's cached
  // tokens are those every one of its generations found cached.
  Usage UsageLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Usage u{.prompt_tokens = prompt_tokens_};
    std::vector<int64_t> cached(prompts_.size(), -1);
    bool all_energy = true;
    double energy = 0;
    for (const Sub& sub : subs_) {
      u.completion_tokens += sub.completion_tokens;
      u.resumed_tokens += sub.resumed_tokens;
      int64_t& c = cached[sub.prompt];
      c = c < 0 ? sub.cached_tokens : std::min(c, sub.cached_tokens);
      all_energy = all_energy && sub.energy_joules.has_value();
      if (sub.energy_joules) energy += *sub.energy_joules;
      if (u.energy_source.empty()) u.energy_source = sub.energy_source;
    }
    for (int64_t c : cached) u.cached_tokens += std::max<int64_t>(c, 0);
    if (all_energy) {
      u.energy_joules = energy;
    } else {
      u.energy_source.clear();
    }
    return u;
  }

  // The returned choices: per prompt, its n generations, or with best_of the
  // n with the highest cumulative log probability, best first.
  std::vector<ChoiceResult> ChoicesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<ChoiceResult> choices;
    for (size_t p = 0; p < prompts_.size(); ++p) {
      std::vector<Sub*> ranked;
      for (Sub& sub : subs_) {
        if (sub.prompt == static_cast<int>(p)) ranked.push_back(&sub);
      }
      if (request_.best_of > request_.n) {
        std::stable_sort(ranked.begin(), ranked.end(), [](const Sub* a, const Sub* b) {
          return a->stream.cumulative_logprob() > b->stream.cumulative_logprob();
        });
      }
      for (int i = 0; i < request_.n && i < static_cast<int>(ranked.size()); ++i) {
        ChoiceResult c = std::move(ranked[i]->result);
        c.index = static_cast<int>(p) * request_.n + i;
        c.finish_reason = ranked[i]->finish_reason;
        c.has_logprobs = request_.logprobs;
        choices.push_back(std::move(c));
      }
    }
    return choices;
  }

  // Every generation finished: the usage chunk and [DONE], or the response.
  void FinishLocked(std::string* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    const Usage usage = UsageLocked();
    HttpMetrics& m = service_->metrics_;
    m.e2e(header_.tier).Observe(absl::ToDoubleSeconds(service_->clock_->Now() - arrival_));
    m.CountFinished(subs_[0].finish_reason, header_.tier);
    if (request_.stream) {
      if (request_.include_usage) *out += SseEvent(UsageChunkJson(header_, usage));
      *out += kSseDone;
      return;
    }
    m.CountRequest(RouteLabel(header_.endpoint), 200, TierLabel());
    exchange_->Respond(JsonResponse(200, CompletionJson(header_, ChoicesLocked(), usage)));
  }

  // The request failed (generation `failed`): the error answer, and the other
  // generations still running go into `cancel`.
  void FailLocked(const absl::Status& status, const Sub& failed, std::vector<std::string>* cancel)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    failed_ = true;
    for (const Sub& sub : subs_) {
      // The failed one ends by itself (its call is over, or the Router cancels it).
      if (&sub != &failed && !sub.done) cancel->push_back(sub.request_id);
    }
    const absl::Status api = ToApiFields(status, header_.endpoint, PromptParam(failed));
    const ApiError e = ToApiError(api);
    // The client gets the reason only; the details are for the log.
    if (e.http_status >= 500) {
      JOULE_LOG(Info) << "request " << header_.id << " failed: " << status;
    }
    if (!stream_started_) {
      service_->metrics_.CountRequest(RouteLabel(header_.endpoint), e.http_status, TierLabel());
      exchange_->Respond(ApiErrorResponse(api));
      return;
    }
    // Mid-stream the status line is long gone: an error event, then the end.
    exchange_->Send(SseEvent(ErrorJson(e)).append(kSseDone));
    exchange_->EndStream();
  }

  OpenAiService* const service_;
  const CompletionRequest request_;
  const std::vector<OpenAiService::Prepared::PromptInput> prompts_;
  const int64_t prompt_tokens_;
  const ResponseHeader header_;
  const std::shared_ptr<Exchange> exchange_;
  const absl::Time arrival_;
  const bool worker_logprobs_;  // the workers send a log probability per token
  const std::vector<std::string> prompt_params_ = [this] {
    std::vector<std::string> params;
    for (size_t p = 0; p < prompts_.size(); ++p) params.push_back(absl::StrCat("prompt[", p, "]"));
    return params;
  }();
  std::atomic<bool> gone_{false};
  std::atomic<bool> failed_{false};

  absl::Mutex mu_;
  std::vector<Sub> subs_ ABSL_GUARDED_BY(mu_);
  size_t finished_subs_ ABSL_GUARDED_BY(mu_) = 0;
  size_t done_ ABSL_GUARDED_BY(mu_) = 0;
  bool first_token_seen_ ABSL_GUARDED_BY(mu_) = false;
  bool stream_started_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

namespace {

// What the Router writes generation `k`'s responses to; holds the generation
// until `done` detaches it.
class GenerationSink final : public cluster::GenerateSink {
 public:
  GenerationSink(std::shared_ptr<Generation> g, size_t k) : g_(std::move(g)), k_(k) {}
  bool Write(const v1::GenerateResponse& response) override {
    std::shared_ptr<Generation> g = Get();
    return g != nullptr && g->OnResponse(k_, response);
  }
  bool ClientGone() const override {
    std::shared_ptr<Generation> g = Get();
    return g == nullptr || g->client_gone();
  }
  void Done(const absl::Status& status) {
    std::shared_ptr<Generation> g;
    {
      absl::MutexLock lock(&mu_);
      g = std::move(g_);
    }
    if (g) g->OnDone(k_, status);
  }

 private:
  std::shared_ptr<Generation> Get() const {
    absl::MutexLock lock(&mu_);
    return g_;
  }
  mutable absl::Mutex mu_;
  std::shared_ptr<Generation> g_ ABSL_GUARDED_BY(mu_);
  const size_t k_;
};

}  // namespace

OpenAiService::OpenAiService(OpenAiServiceOptions options, const tokenizer::Tokenizer* tokenizer,
                             GenerationBackend* backend, std::shared_ptr<prometheus::Registry> registry,
                             const cluster::Clock* clock)
    : options_(std::move(options)),
      tokenizer_(tokenizer),
      backend_(backend),
      registry_(std::move(registry)),
      clock_(clock),
      metrics_(*registry_),
      started_(absl::ToUnixSeconds(clock->Now())) {
  chat_stop_ids_ = tokenizer::ChatStopTokenIds(options_.chat_format, *tokenizer_);
}

std::string OpenAiService::NewId(Endpoint endpoint) {
  // 128 random bits: one client's id says nothing about another's.
  return NewRequestId(endpoint == Endpoint::kChatCompletions ? "chatcmpl" : "cmpl");
}

bool OpenAiService::Authorized(const HttpRequest& request) const {
  if (options_.api_keys.empty()) return true;
  const std::string_view auth = StdView(request[bhttp::field::authorization]);
  constexpr std::string_view kBearer = "Bearer ";
  const bool bearer = auth.substr(0, kBearer.size()) == kBearer;
  // Every key is compared, in time independent of the keys' contents and lengths.
  const bool match = MatchesAnySecret(bearer ? auth.substr(kBearer.size()) : std::string_view(), options_.api_keys);
  return bearer && match;
}

bool OpenAiService::TryAdmit(scheduler::Tier tier) {
  const size_t i = static_cast<size_t>(tier);
  if (in_flight_[i].fetch_add(1) >= options_.tier_caps[i]) {
    in_flight_[i].fetch_sub(1);
    return false;
  }
  metrics_.running(tier).Increment();
  return true;
}

void OpenAiService::Release(scheduler::Tier tier) {
  in_flight_[static_cast<size_t>(tier)].fetch_sub(1);
  metrics_.running(tier).Decrement();
}

void OpenAiService::RespondError(Exchange& exchange, std::string_view route, const absl::Status& status,
                                 std::string_view tier) {
  HttpResponse r = ApiErrorResponse(status);
  // The client gets the reason only; the details are for the log.
  if (r.result_int() >= 500) {
    JOULE_LOG(Info) << AbslView(route) << " answered " << r.result_int() << ": " << status;
  }
  metrics_.CountRequest(route, r.result_int(), tier);
  exchange.Respond(std::move(r));
}

HttpResponse OpenAiService::ErrorResponse(int http_status, const std::string& message) {
  metrics_.CountRequest(kRouteOther, http_status, "");
  return ApiErrorResponse(WithHttpStatus(absl::InvalidArgumentError(message), http_status));
}

void OpenAiService::Handle(HttpRequest request, std::shared_ptr<Exchange> exchange) {
  const absl::Time arrival = clock_->Now();
  std::string_view target = StdView(request.target());
  const std::string_view path = target.substr(0, target.find('?'));
  const bhttp::verb method = request.method();

  // Which methods a path takes; unknown paths are 404, known ones with another method 405.
  struct Route {
    std::string_view path;
    bhttp::verb method;
    bool prefix = false;
  };
  static constexpr Route kRoutes[] = {
      {"/v1/models", bhttp::verb::get},       {"/v1/models/", bhttp::verb::get, true},
      {"/v1/completions", bhttp::verb::post}, {"/v1/chat/completions", bhttp::verb::post},
      {"/health", bhttp::verb::get},          {"/ready", bhttp::verb::get},
      {"/metrics", bhttp::verb::get},
  };
  const Route* route = nullptr;
  for (const Route& r : kRoutes) {
    if (r.prefix ? (path.size() > r.path.size() && path.substr(0, r.path.size()) == r.path) : path == r.path) {
      route = &r;
      break;
    }
  }
  std::string_view label = kRouteOther;
  if (route != nullptr && !route->prefix) label = route->path;
  if (route != nullptr && route->prefix) label = kRouteModels;

  const bool guarded = path.substr(0, 4) == "/v1/" || (path == "/metrics" && options_.metrics_require_key);
  if (guarded && !Authorized(request)) {
    return RespondError(*exchange, label,
                        WithErrorCode(absl::UnauthenticatedError(
                                          "missing or incorrect API key; send 'Authorization: Bearer KEY'"),
                                      "invalid_api_key"));
  }
  if (route == nullptr) {
    return RespondError(*exchange, label,
                        WithErrorCode(absl::NotFoundError(absl::StrCat(
                                          "Invalid URL (", AbslView(StdView(request.method_string())), " ",
                                          AbslView(path), ")")),
                                      "unknown_url"));
  }
  if (method != route->method) {
    HttpResponse r = ApiErrorResponse(WithHttpStatus(
        absl::InvalidArgumentError(absl::StrCat("method ", AbslView(StdView(request.method_string())),
                                                " is not allowed on ", AbslView(path), "; use ",
                                                AbslView(StdView(bhttp::to_string(route->method))))),
        405));
    r.set(bhttp::field::allow, bhttp::to_string(route->method));
    metrics_.CountRequest(label, 405, "");
    return exchange->Respond(std::move(r));
  }

  if (path == "/health") {
    metrics_.CountRequest(label, 200, "");
    return exchange->Respond(JsonResponse(200, R"({"status":"ok"})"));
  }
  if (path == "/ready") {
    const absl::Status ready = backend_->Ready();
    if (!ready.ok()) return RespondError(*exchange, label, ready);
    metrics_.CountRequest(label, 200, "");
    return exchange->Respond(JsonResponse(200, R"({"status":"ready"})"));
  }
  if (path == "/metrics") {
    metrics_.CountRequest(label, 200, "");  // counted before serializing, so a scrape sees itself
    HttpResponse r(bhttp::status::ok, 11);
    r.set(bhttp::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    std::vector<prometheus::MetricFamily> families = registry_->Collect();
    for (const auto& c : options_.collectables) {
      std::vector<prometheus::MetricFamily> more = c->Collect();
      std::move(more.begin(), more.end(), std::back_inserter(families));
    }
    r.body() = prometheus::TextSerializer().Serialize(families);
    return exchange->Respond(std::move(r));
  }
  if (path == kRouteModels) {
    metrics_.CountRequest(label, 200, "");
    return exchange->Respond(JsonResponse(200, ModelListJson(options_.model_name, started_, options_.max_context)));
  }
  if (route->prefix) {  // /v1/models/ID
    const std::string_view id = path.substr(route->path.size());
    if (id != options_.model_name) {
      return RespondError(*exchange, label,
                          WithErrorCode(WithParam(absl::NotFoundError(absl::StrCat(
                                                      "The model '", AbslView(id), "' does not exist; this server serves '",
                                                      options_.model_name, "'")),
                                                  "model"),
                                        "model_not_found"));
    }
    metrics_.CountRequest(label, 200, "");
    return exchange->Respond(JsonResponse(200, ModelJson(options_.model_name, started_, options_.max_context)));
  }
  HandleCompletion(request, path == kRouteChat ? Endpoint::kChatCompletions : Endpoint::kCompletions,
                   std::move(exchange), arrival);
}

absl::StatusOr<std::vector<int32_t>> OpenAiService::PromptTokens(const CompletionRequest& request,
                                                                 size_t prompt) const {
  if (request.endpoint == Endpoint::kChatCompletions) {
    auto text = tokenizer::RenderChat(options_.chat_format, request.messages, /*add_generation_prompt=*/true);
    if (!text.ok()) return WithParam(text.status(), "messages");
    return tokenizer_->Encode(*text);  // the template wrote the BOS, if the model has one
  }
  const Prompt& p = request.prompts[prompt];
  if (p.is_tokens) return p.token_ids;
  return tokenizer_->EncodeWithSpecialTokens(p.text);  // as Hugging Face's tokenizer(prompt)
}

namespace {

// The sampling every generation of a request shares; seeds differ per generation.
v1::SamplingParams SharedSampling(const CompletionRequest& r, const std::vector<int32_t>& stop_ids) {
  v1::SamplingParams sampling;
  sampling.set_temperature(static_cast<float>(r.temperature));
  sampling.set_top_p(static_cast<float>(r.top_p));
  sampling.set_top_k(r.top_k);
  sampling.set_ignore_eos(r.ignore_eos);
  sampling.set_presence_penalty(static_cast<float>(r.presence_penalty));
  sampling.set_frequency_penalty(static_cast<float>(r.frequency_penalty));
  sampling.set_repetition_penalty(static_cast<float>(r.repetition_penalty));
  for (const auto& [id, bias] : r.logit_bias) (*sampling.mutable_logit_bias())[id] = static_cast<float>(bias);
  // best_of ranks the generations by their cumulative log probability.
  sampling.set_logprobs(r.logprobs || r.best_of > r.n);
  sampling.set_top_logprobs(r.logprobs ? r.top_logprobs : 0);
  sampling.set_prompt_logprobs(r.echo && r.logprobs);
  for (int32_t id : stop_ids) sampling.add_stop_token_ids(id);
  return sampling;
}

}  // namespace

absl::StatusOr<int64_t> OpenAiService::MaxTokens(const CompletionRequest& r, Endpoint endpoint,
                                                 int64_t prompt_tokens, const std::string& prompt_param) const {
  const int64_t room = options_.max_context - prompt_tokens;
  int64_t max_tokens = 0;
  if (r.max_tokens.has_value()) {
    max_tokens = *r.max_tokens;
  } else {
    max_tokens = endpoint == Endpoint::kChatCompletions ? room
                                                        : std::min(options_.default_completion_tokens, room);
  }
  if (room >= 1 && max_tokens <= room) return max_tokens;
  return WithErrorCode(
      InvalidField(prompt_param,
                   absl::StrCat("this model's maximum context length is ", options_.max_context,
                                " tokens; this request asks for ", prompt_tokens + std::max<int64_t>(max_tokens, 1),
                                " (", prompt_tokens, " in the ", prompt_param, ", ", std::max<int64_t>(max_tokens, 1),
                                " for the completion); shorten the prompt or lower max_tokens")),
      "context_length_exceeded");
}

absl::StatusOr<OpenAiService::Prepared> OpenAiService::Prepare(std::string_view body, Endpoint endpoint) const {
  Prepared p;
  ASSIGN_OR_RETURN(p.request, ParseCompletionRequest(body, endpoint, options_.limits));
  const CompletionRequest& r = p.request;
  if (r.model != options_.model_name) {
    return WithErrorCode(
        WithParam(absl::NotFoundError(absl::StrCat("The model '", r.model, "' does not exist; this server serves '",
                                                   options_.model_name, "'")),
                  "model"),
        "model_not_found");
  }
  const int64_t vocab = options_.vocab_size > 0 ? options_.vocab_size : tokenizer_->vocab_size();
  for (const auto& [id, bias] : r.logit_bias) {
    if (id >= vocab) {
      return InvalidField("logit_bias", absl::StrCat("token id ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }

  const v1::SamplingParams sampling =
      SharedSampling(r, endpoint == Endpoint::kChatCompletions ? chat_stop_ids_ : std::vector<int32_t>{});

  const size_t prompts = endpoint == Endpoint::kChatCompletions ? 1 : r.prompts.size();
  for (size_t i = 0; i < prompts; ++i) {
    const std::string prompt_param = endpoint == Endpoint::kChatCompletions ? "messages"
                                     : prompts > 1                         ? absl::StrCat("prompt[", i, "]")
                                                                           : "prompt";
    absl::StatusOr<std::vector<int32_t>> tokens = PromptTokens(r, i);
    if (!tokens.ok()) return WithParam(tokens.status(), prompt_param);
    std::vector<int32_t> ids = *std::move(tokens);
    const int64_t prompt_tokens = static_cast<int64_t>(ids.size());
    if (ids.empty()) return InvalidField(prompt_param, "must not be empty");

    ASSIGN_OR_RETURN(const int64_t max_tokens, MaxTokens(r, endpoint, prompt_tokens, prompt_param));
    for (int j = 0; j < r.best_of; ++j) {
      v1::GenerateRequest& g = p.generates.emplace_back();
      g.mutable_prompt_token_ids()->Add(ids.begin(), ids.end());
      v1::SamplingParams* s = g.mutable_sampling();
      *s = sampling;
      s->set_max_tokens(static_cast<int32_t>(max_tokens));
      // Choice j of a seeded request: seed + j, so that each choice differs
      // and the whole answer repeats.
      if (r.seed) s->set_seed(*r.seed + static_cast<uint64_t>(j));
      g.set_service_tier(std::string(scheduler::OpenAiServiceTier(r.tier)));
    }
    Prepared::PromptInput input;
    if (r.echo) {
      input.echo_text = r.prompts[i].is_tokens ? tokenizer_->Decode(ids) : r.prompts[i].text;
    }
    input.ids = std::move(ids);
    p.prompts.push_back(std::move(input));
    p.prompt_tokens += prompt_tokens;
  }
  return p;
}

void OpenAiService::HandleCompletion(const HttpRequest& request, Endpoint endpoint,
                                     std::shared_ptr<Exchange> exchange, absl::Time arrival) {
  const std::string_view route = RouteLabel(endpoint);
  absl::StatusOr<Prepared> prepared = Prepare(request.body(), endpoint);
  if (!prepared.ok()) return RespondError(*exchange, route, prepared.status());
  const scheduler::Tier tier = prepared->request.tier;
  const std::string_view tier_name = scheduler::TierName(tier);

  ResponseHeader header{.endpoint = endpoint,
                        .id = NewId(endpoint),
                        .created = absl::ToUnixSeconds(arrival),
                        .model = options_.model_name,
                        .tier = tier};
  // One generation keeps the response's id; several are ID-0, ID-1, ...
  std::vector<v1::GenerateRequest>& generates = prepared->generates;
  for (size_t k = 0; k < generates.size(); ++k) {
    generates[k].set_request_id(generates.size() == 1 ? header.id : absl::StrCat(header.id, "-", k));
    if (absl::Status valid = backend_->Validate(generates[k]); !valid.ok()) {
      const size_t prompt = k / static_cast<size_t>(prepared->request.best_of);
      const std::string prompt_param = endpoint == Endpoint::kChatCompletions ? "messages"
                                       : prepared->prompts.size() > 1 ? absl::StrCat("prompt[", prompt, "]")
                                                                      : "prompt";
      return RespondError(*exchange, route, ToApiFields(valid, endpoint, prompt_param), tier_name);
    }
  }
  if (!TryAdmit(tier)) {
    return RespondError(
        *exchange, route,
        WithErrorCode(absl::ResourceExhaustedError(absl::StrCat(
                          "the ", AbslView(tier_name), " tier is full (",
                          options_.tier_caps[static_cast<size_t>(tier)],
                          " requests in flight at the coordinator); retry after a moment or use another tier")),
                      "rate_limit_exceeded"),
        tier_name);
  }
  metrics_.prompt_tokens(tier).Increment(static_cast<double>(prepared->prompt_tokens));

  const std::vector<v1::GenerateRequest> to_launch = std::move(generates);
  auto generation =
      std::make_shared<Generation>(this, std::move(*prepared), to_launch, std::move(header), exchange, arrival);
  exchange->OnClientGone([g = std::weak_ptr<Generation>(generation)] {
    if (auto locked = g.lock()) locked->OnClientGone();
  });
  for (size_t k = 0; k < to_launch.size(); ++k) {
    // A generation that failed to start (or a client gone) ends the request:
    // the rest need not start.
    if (generation->client_gone()) {
      generation->OnDone(k, absl::CancelledError("not started: the request already ended"));
      continue;
    }
    auto sink = std::make_shared<GenerationSink>(generation, k);
    backend_->GenerateAsync(to_launch[k], absl::InfiniteFuture(), sink,
                            [sink](absl::Status status) { sink->Done(status); });
  }
}

}  // namespace joule::http
