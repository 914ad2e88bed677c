#include "coordinator/http/http_metrics.h"

#include <string>

namespace joule::http {
namespace {

// vLLM's buckets for inter-token latency.
const prometheus::Histogram::BucketBoundaries& Buckets(bool interval) {
  static const auto* gaps = new prometheus::Histogram::BucketBoundaries{
      0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
  return interval ? *gaps : LatencyBuckets();
}

template <typename Builder>
auto& Register(Builder builder, const char* name, const char* help, prometheus::Registry& registry) {
  return builder.Name(name).Help(help).Register(registry);
}

prometheus::Labels TierLabel(scheduler::Tier t) { return {{"tier", std::string(scheduler::TierName(t))}}; }

}  // namespace

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* latency = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
      2.5,   5.0,   7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
  return *latency;
}

HttpMetrics::HttpMetrics(prometheus::Registry& registry) {
#define JOULE_HTTP_METRIC_BUILDER_Counter prometheus::BuildCounter()
#define JOULE_HTTP_METRIC_BUILDER_Gauge prometheus::BuildGauge()
#define JOULE_HTTP_METRIC_BUILDER_LatencyHistogram prometheus::BuildHistogram()
#define JOULE_HTTP_METRIC_BUILDER_IntervalHistogram prometheus::BuildHistogram()
#define JOULE_HTTP_METRIC_REGISTER(kind, member, name, help, labels) \
  member##_family_ = &Register(JOULE_HTTP_METRIC_BUILDER_##kind, name, help, registry);
  JOULE_HTTP_METRICS(JOULE_HTTP_METRIC_REGISTER)
#undef JOULE_HTTP_METRIC_REGISTER

  // Tier-only series exist from the start, so dashboards see zeros rather than gaps.
  for (scheduler::Tier t : scheduler::kAllTiers) {
    const size_t i = Index(t);
    prompt_tokens_[i] = &prompt_tokens_family_->Add(TierLabel(t));
    cached_prompt_tokens_[i] = &cached_prompt_tokens_family_->Add(TierLabel(t));
    generation_tokens_[i] = &generation_tokens_family_->Add(TierLabel(t));
    request_energy_[i] = &request_energy_family_->Add(TierLabel(t));
    tokens_per_joule_[i] = &tokens_per_joule_family_->Add(TierLabel(t));
    running_[i] = &running_family_->Add(TierLabel(t));
    ttft_[i] = &ttft_family_->Add(TierLabel(t), Buckets(false));
    e2e_[i] = &e2e_family_->Add(TierLabel(t), Buckets(false));
    itl_[i] = &itl_family_->Add(TierLabel(t), Buckets(true));
  }
}

void HttpMetrics::CountRequest(std::string_view route, int http_status, std::string_view tier) {
  requests_family_
      ->Add({{"route", std::string(route)}, {"status", std::to_string(http_status)}, {"tier", std::string(tier)}})
      .Increment();
}

void HttpMetrics::AddRequestEnergy(scheduler::Tier t, double joules, int64_t completion_tokens) {
  const size_t i = Index(t);
  request_energy_[i]->Increment(joules);
  absl::MutexLock lock(&energy_mu_);
  energy_joules_[i] += joules;
  energy_tokens_[i] += static_cast<double>(completion_tokens);
  if (energy_joules_[i] > 0) tokens_per_joule_[i]->Set(energy_tokens_[i] / energy_joules_[i]);
}

void HttpMetrics::CountFinished(std::string_view finished_reason, scheduler::Tier tier) {
  request_success_family_
      ->Add({{"finished_reason", std::string(finished_reason)}, {"tier", std::string(scheduler::TierName(tier))}})
      .Increment();
}

}  // namespace joule::http
