// The front door's Prometheus metrics, declared in one table. Names follow
// vLLM's where one exists (vllm:time_to_first_token_seconds ->
// joule_time_to_first_token_seconds, ...); every tier-labelled series uses our
// tier names (fast, priority, standard, batch).
#pragma once

#include <array>
#include <string_view>

#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "scheduler/tier.h"

namespace joule::http {

// X(kind, member, name, help, labels). kind is Counter, Gauge, LatencyHistogram
// or IntervalHistogram (finer buckets, for inter-token gaps); "tier" as the only
// label means one series per tier is created up front.
#define JOULE_HTTP_METRICS(X)                                                                         \
  X(Counter, requests, "joule_http_requests_total",                                                   \
    "HTTP requests answered, by route, status code and tier (499: the client went away)",           \
    "route,status,tier")                                                                              \
  X(Counter, request_success, "joule_request_success_total",                                          \
    "Generations that finished, by finished_reason (stop, length) and tier", "finished_reason,tier") \
  X(Counter, prompt_tokens, "joule_prompt_tokens_total", "Prompt tokens of admitted requests", "tier") \
  X(Counter, cached_prompt_tokens, "joule_prompt_tokens_cached_total",                                \
    "Prompt tokens of finished requests that their rank's prefix cache held "                        \
    "(usage.prompt_tokens_details.cached_tokens)", "tier")                                            \
  X(Counter, generation_tokens, "joule_generation_tokens_total",                                      \
    "Generated tokens delivered to clients", "tier")                                                 \
  X(Counter, request_energy, "joule_request_energy_joules_total",                                     \
    "Energy charged to finished requests by the workers' meters (usage.energy_joules); "            \
    "generation tokens / this = tokens per joule", "tier")                                            \
  X(Gauge, tokens_per_joule, "joule_tokens_per_joule",                                                \
    "Completion tokens / energy of the requests that finished with an energy figure, since start",  \
    "tier")                                                                                           \
  X(Gauge, running, "joule_num_requests_running",                                                     \
    "Requests admitted at the coordinator and not yet finished", "tier")                             \
  X(LatencyHistogram, ttft, "joule_time_to_first_token_seconds",                                      \
    "Time from the request's arrival to its first generated token", "tier")                          \
  X(LatencyHistogram, e2e, "joule_e2e_request_latency_seconds",                                       \
    "Time from the request's arrival to its last token", "tier")                                     \
  X(IntervalHistogram, itl, "joule_inter_token_latency_seconds",                                      \
    "Time between consecutive generated tokens of one request", "tier")

// vLLM's buckets for TTFT, end-to-end latency and queue time.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets();

class HttpMetrics {
 public:
  explicit HttpMetrics(prometheus::Registry& registry);

  // tier empty: the request never got as far as a tier (bad body, other routes).
  void CountRequest(std::string_view route, int http_status, std::string_view tier);
  void CountFinished(std::string_view finished_reason, scheduler::Tier tier);
  prometheus::Counter& prompt_tokens(scheduler::Tier t) { return *prompt_tokens_[Index(t)]; }
  prometheus::Counter& cached_prompt_tokens(scheduler::Tier t) {
    return *cached_prompt_tokens_[Index(t)];
  }
  prometheus::Counter& generation_tokens(scheduler::Tier t) { return *generation_tokens_[Index(t)]; }
  prometheus::Gauge& running(scheduler::Tier t) { return *running_[Index(t)]; }
  // A finished request's energy (usage.energy_joules) and completion tokens:
  // joule_request_energy_joules_total and joule_tokens_per_joule.
  void AddRequestEnergy(scheduler::Tier t, double joules, int64_t completion_tokens);
  prometheus::Histogram& ttft(scheduler::Tier t) { return *ttft_[Index(t)]; }
  prometheus::Histogram& e2e(scheduler::Tier t) { return *e2e_[Index(t)]; }
  prometheus::Histogram& itl(scheduler::Tier t) { return *itl_[Index(t)]; }

 private:
  static size_t Index(scheduler::Tier t) { return static_cast<size_t>(t); }
  template <typename T>
  using PerTier = std::array<T*, std::size(scheduler::kAllTiers)>;

#define JOULE_HTTP_METRIC_MEMBER(kind, member, name, help, labels) \
  prometheus::Family<JOULE_HTTP_METRIC_TYPE_##kind>* member##_family_ = nullptr;
#define JOULE_HTTP_METRIC_TYPE_Counter prometheus::Counter
#define JOULE_HTTP_METRIC_TYPE_Gauge prometheus::Gauge
#define JOULE_HTTP_METRIC_TYPE_LatencyHistogram prometheus::Histogram
#define JOULE_HTTP_METRIC_TYPE_IntervalHistogram prometheus::Histogram
  JOULE_HTTP_METRICS(JOULE_HTTP_METRIC_MEMBER)
#undef JOULE_HTTP_METRIC_MEMBER

  PerTier<prometheus::Counter> prompt_tokens_{};
  PerTier<prometheus::Counter> cached_prompt_tokens_{};
  PerTier<prometheus::Counter> generation_tokens_{};
  PerTier<prometheus::Gauge> running_{};
  PerTier<prometheus::Counter> request_energy_{};
  PerTier<prometheus::Gauge> tokens_per_joule_{};
  absl::Mutex energy_mu_;
  std::array<double, 4> energy_joules_ ABSL_GUARDED_BY(energy_mu_) = {};
  std::array<double, 4> energy_tokens_ ABSL_GUARDED_BY(energy_mu_) = {};
  PerTier<prometheus::Histogram> ttft_{};
  PerTier<prometheus::Histogram> e2e_{};
  PerTier<prometheus::Histogram> itl_{};
};

}  // namespace joule::http
