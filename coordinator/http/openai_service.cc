#include "coordinator/http/openai_service.h"

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
absl::Status ToApiFields(const absl::Status& status, Endpoint endpoint) {
  if (status.code() != absl::StatusCode::kInvalidArgument) return status;
  const std::string_view msg(status.message().data(), status.message().size());
  const std::string_view prompt = endpoint == Endpoint::kChatCompletions ? "messages" : "prompt";
  struct Mapping {
    std::string_view proto_field;
    std::string_view param;
  };
  const Mapping mappings[] = {{"prompt_token_ids", prompt},       {"sampling.max_tokens", "max_tokens"},
                              {"sampling.temperature", "temperature"}, {"sampling.top_p", "top_p"},
                              {"sampling.top_k", "top_k"},         {"sampling.stop_token_ids", "stop"},
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
// answer. Responses arrive on gRPC's threads (one at a time), the client's
// departure on the connection's strand; mu_ orders them.
class Generation : public std::enable_shared_from_this<Generation> {
 public:
  Generation(OpenAiService* service, OpenAiService::Prepared prepared, ResponseHeader header,
             std::shared_ptr<Exchange> exchange, absl::Time arrival)
      : service_(service),
        request_(std::move(prepared.request)),
        prompt_tokens_(prepared.prompt_tokens),
        header_(std::move(header)),
        exchange_(std::move(exchange)),
        arrival_(arrival),
        text_(*service->tokenizer_, request_.stop) {}

  const std::string& id() const { return header_.id; }
  bool client_gone() const { return gone_.load(); }

  // A worker response. False once the client is gone or a stop string ended
  // the text: the Router then cancels the worker call.
  bool OnResponse(const v1::GenerateResponse& response) {
    absl::MutexLock lock(&mu_);
    if (finished_ || gone_) return false;
    const absl::Time now = service_->clock_->Now();
    HttpMetrics& m = service_->metrics_;
    std::string out;
    for (int32_t id : response.token_ids()) {
      ++completion_tokens_;
      m.generation_tokens(header_.tier).Increment();
      if (completion_tokens_ == 1) {
        m.ttft(header_.tier).Observe(absl::ToDoubleSeconds(now - arrival_));
      } else {
        m.itl(header_.tier).Observe(absl::ToDoubleSeconds(now - last_token_));
      }
      last_token_ = now;
      std::string delta = text_.Push(id);
      if (request_.stream) {
        StartStreamLocked(&out);
        out += SseEvent(ChunkJson(header_, {.text = delta, .usage_null = request_.include_usage}));
      } else {
        text_so_far_ += delta;
      }
      if (text_.stopped()) break;
    }
    if (text_.stopped()) {
      FinishLocked("stop", "", &out);
    } else if (response.finish_reason() == v1::FINISH_REASON_CANCELLED) {
      // Someone ended it early (not this client, who would be gone): not a
      // normal finish, whatever was streamed so far.
      if (!out.empty()) exchange_->Send(std::move(out));
      FailLocked(absl::CancelledError(absl::StrCat("request ", header_.id, " was cancelled on rank ",
                                                   response.rank(), " before it finished")));
      return false;
    } else if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      resumed_tokens_ = response.resumed_tokens();
      cached_tokens_ = response.cached_tokens();
      if (!response.energy_source().empty()) {
        energy_joules_ = response.energy_joules();
        energy_source_ = response.energy_source();
        m.AddRequestEnergy(header_.tier, response.energy_joules(), completion_tokens_);
      }
      std::string tail = text_.Flush();
      const bool stop = text_.stopped() || response.finish_reason() == v1::FINISH_REASON_STOP;
      FinishLocked(stop ? "stop" : "length", tail, &out);
    }
    if (!out.empty()) exchange_->Send(std::move(out));
    if (finished_ && request_.stream) exchange_->EndStream();
    // After a stop string the worker would go on generating: have it stop.
    return !text_.stopped();
  }

  // The backend's outcome; runs once, after the last OnResponse.
  void OnDone(const absl::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (!finished_ && !gone_) FailLocked(status.ok() ? absl::InternalError(
                                                             "the worker ended the request without a finish reason")
                                                       : status);
      if (gone_ && !finished_) service_->metrics_.CountRequest(RouteLabel(header_.endpoint), 499, TierLabel());
    }
    service_->Release(header_.tier);
  }

  // The connection closed before the answer was complete.
  void OnClientGone() {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || gone_) return;
      gone_ = true;
    }
    // Outside mu_: the backend may finish the call (and run OnDone) right here.
    service_->backend_->Cancel(header_.id);
  }

 private:
  std::string_view TierLabel() const { return scheduler::TierName(header_.tier); }

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
      *out += SseEvent(ChunkJson(header_, {.role_only = true, .usage_null = request_.include_usage}));
    }
  }

  void FinishLocked(std::string_view reason, const std::string& tail, std::string* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    const Usage usage{.prompt_tokens = prompt_tokens_,
                      .completion_tokens = completion_tokens_,
                      .energy_joules = energy_joules_,
                      .energy_source = energy_source_,
                      .resumed_tokens = resumed_tokens_,
                      .cached_tokens = cached_tokens_};
    HttpMetrics& m = service_->metrics_;
    m.e2e(header_.tier).Observe(absl::ToDoubleSeconds(service_->clock_->Now() - arrival_));
    m.CountFinished(reason, header_.tier);
    if (request_.stream) {
      StartStreamLocked(out);
      *out += SseEvent(ChunkJson(header_, {.text = tail, .finish_reason = reason, .usage_null = request_.include_usage}));
      if (request_.include_usage) *out += SseEvent(UsageChunkJson(header_, usage));
      *out += kSseDone;
    } else {
      text_so_far_ += tail;
      m.CountRequest(RouteLabel(header_.endpoint), 200, TierLabel());
      exchange_->Respond(JsonResponse(200, CompletionJson(header_, text_so_far_, reason, usage)));
    }
  }

  void FailLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    const absl::Status api = ToApiFields(status, header_.endpoint);
    const ApiError e = ToApiError(api);
    // The client gets the reason only; the details are for the log.
    if (e.http_status >= 500) JOULE_LOG(Info) << "request " << header_.id << " failed: " << status;
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
  const int64_t prompt_tokens_;
  const ResponseHeader header_;
  const std::shared_ptr<Exchange> exchange_;
  const absl::Time arrival_;
  std::atomic<bool> gone_{false};

  absl::Mutex mu_;
  TextStream text_ ABSL_GUARDED_BY(mu_);
  std::string text_so_far_ ABSL_GUARDED_BY(mu_);  // non-streamed responses
  int64_t completion_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<double> energy_joules_ ABSL_GUARDED_BY(mu_);
  int64_t resumed_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cached_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  std::string energy_source_ ABSL_GUARDED_BY(mu_);
  absl::Time last_token_ ABSL_GUARDED_BY(mu_);
  bool stream_started_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

namespace {

// What the Router writes to; holds the generation until `done` detaches it.
class GenerationSink final : public cluster::GenerateSink {
 public:
  explicit GenerationSink(std::shared_ptr<Generation> g) : g_(std::move(g)) {}
  bool Write(const v1::GenerateResponse& response) override {
    std::shared_ptr<Generation> g = Get();
    return g != nullptr && g->OnResponse(response);
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
    if (g) g->OnDone(status);
  }

 private:
  std::shared_ptr<Generation> Get() const {
    absl::MutexLock lock(&mu_);
    return g_;
  }
  mutable absl::Mutex mu_;
  std::shared_ptr<Generation> g_ ABSL_GUARDED_BY(mu_);
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
  for (const char* stop : {"<|im_end|>", "<|endoftext|>"}) {
    if (auto id = tokenizer_->TokenId(stop)) chat_stop_ids_.push_back(*id);
  }
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
  if (r.result_int() >= 500) JOULE_LOG(Info) << AbslView(route) << " answered " << r.result_int() << ": " << status;
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

absl::StatusOr<std::vector<int32_t>> OpenAiService::PromptTokens(const CompletionRequest& request) const {
  if (request.endpoint == Endpoint::kChatCompletions) {
    auto text = tokenizer::RenderChatMl(request.messages, /*add_generation_prompt=*/true);
    if (!text.ok()) return WithParam(text.status(), "messages");
    return tokenizer_->Encode(*text);
  }
  if (request.prompt_is_tokens) return request.prompt_token_ids;
  return tokenizer_->Encode(request.prompt_text);
}

absl::StatusOr<OpenAiService::Prepared> OpenAiService::Prepare(std::string_view body, Endpoint endpoint) const {
  Prepared p;
  ASSIGN_OR_RETURN(p.request, ParseCompletionRequest(body, endpoint));
  const CompletionRequest& r = p.request;
  if (r.model != options_.model_name) {
    return WithErrorCode(
        WithParam(absl::NotFoundError(absl::StrCat("The model '", r.model, "' does not exist; this server serves '",
                                                   options_.model_name, "'")),
                  "model"),
        "model_not_found");
  }
  const std::string_view prompt_param = endpoint == Endpoint::kChatCompletions ? "messages" : "prompt";
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, PromptTokens(r));
  p.prompt_tokens = static_cast<int64_t>(ids.size());
  if (ids.empty()) return InvalidField(prompt_param, "must not be empty");

  const int64_t room = options_.max_context - p.prompt_tokens;
  int64_t max_tokens = 0;
  if (r.max_tokens.has_value()) {
    max_tokens = *r.max_tokens;
  } else {
    max_tokens = endpoint == Endpoint::kChatCompletions ? room
                                                        : std::min(options_.default_completion_tokens, room);
  }
  if (room < 1 || max_tokens > room) {
    return WithErrorCode(
        InvalidField(prompt_param,
                     absl::StrCat("this model's maximum context length is ", options_.max_context,
                                  " tokens; this request asks for ", p.prompt_tokens + std::max<int64_t>(max_tokens, 1),
                                  " (", p.prompt_tokens, " in the ", AbslView(prompt_param), ", ",
                                  std::max<int64_t>(max_tokens, 1),
                                  " for the completion); shorten the prompt or lower max_tokens")),
        "context_length_exceeded");
  }

  v1::GenerateRequest& g = p.generate;
  g.mutable_prompt_token_ids()->Add(ids.begin(), ids.end());
  v1::SamplingParams* s = g.mutable_sampling();
  s->set_max_tokens(static_cast<int32_t>(max_tokens));
  s->set_temperature(static_cast<float>(r.temperature));
  s->set_top_p(static_cast<float>(r.top_p));
  s->set_top_k(r.top_k);
  if (r.seed) s->set_seed(*r.seed);
  s->set_ignore_eos(r.ignore_eos);
  if (endpoint == Endpoint::kChatCompletions) {
    for (int32_t id : chat_stop_ids_) s->add_stop_token_ids(id);
  }
  g.set_service_tier(std::string(scheduler::OpenAiServiceTier(r.tier)));
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
  prepared->generate.set_request_id(header.id);
  if (absl::Status valid = backend_->Validate(prepared->generate); !valid.ok()) {
    return RespondError(*exchange, route, ToApiFields(valid, endpoint), tier_name);
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

  v1::GenerateRequest generate = std::move(prepared->generate);
  auto generation = std::make_shared<Generation>(this, std::move(*prepared), std::move(header), exchange, arrival);
  auto sink = std::make_shared<GenerationSink>(generation);
  exchange->OnClientGone([g = std::weak_ptr<Generation>(generation)] {
    if (auto locked = g.lock()) locked->OnClientGone();
  });
  backend_->GenerateAsync(generate, absl::InfiniteFuture(), sink,
                          [sink](absl::Status status) { sink->Done(status); });
}

}  // namespace joule::http
