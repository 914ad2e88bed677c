#include "coordinator/http/scheduler_metrics.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/http/metric_families.h"

namespace joule::http {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

}  // namespace

std::vector<MetricFamily> SchedulerMetricFamilies(const scheduler::SchedulerSnapshot& snapshot) {
  MetricFamily attainment = NewFamily(
      "joule_slo_attainment", MetricType::Gauge,
      "Finished requests that met their tier's TTFT and TPOT targets / finished (1 before any)");
  MetricFamily recent = NewFamily("joule_slo_recent_attainment", MetricType::Gauge,
                                  "SLO attainment over the scheduler's recent window");
  MetricFamily target = NewFamily("joule_slo_attainment_target", MetricType::Gauge,
                                  "The tier's configured attainment target");
  MetricFamily outcomes = NewFamily(
      "joule_slo_requests_total", MetricType::Counter,
      "Requests by SLO outcome: attained, missed (finished late), rejected (429), cancelled");
  MetricFamily queued = NewFamily("joule_scheduler_queued_requests", MetricType::Gauge,
                                  "Requests held in the coordinator's tier queue");
  MetricFamily dispatched = NewFamily("joule_scheduler_dispatched_requests", MetricType::Gauge,
                                      "Requests sent to a rank that have no token yet");
  for (const scheduler::TierSnapshot& t : snapshot.tiers) {
    const std::string tier(scheduler::TierName(t.tier));
    AddSample(&attainment, {{"tier", tier}}, t.stats.attainment());
    AddSample(&recent, {{"tier", tier}}, t.recent_attainment);
    AddSample(&target, {{"tier", tier}}, t.slo.attainment);
    AddSample(&outcomes, {{"tier", tier}, {"outcome", "attained"}}, static_cast<double>(t.stats.attained));
    AddSample(&outcomes, {{"tier", tier}, {"outcome", "missed"}},
        static_cast<double>(t.stats.finished - t.stats.attained));
    AddSample(&outcomes, {{"tier", tier}, {"outcome", "rejected"}}, static_cast<double>(t.stats.rejected));
    AddSample(&outcomes, {{"tier", tier}, {"outcome", "cancelled"}}, static_cast<double>(t.stats.cancelled));
    AddSample(&queued, {{"tier", tier}}, static_cast<double>(t.queued));
    AddSample(&dispatched, {{"tier", tier}}, static_cast<double>(t.dispatched));
  }

  MetricFamily seconds = NewFamily(
      "joule_step_cost_seconds", MetricType::Gauge,
      "Step time model of a rank: seconds fixed, per batch token, per context token");
  MetricFamily joules = NewFamily(
      "joule_step_cost_joules", MetricType::Gauge,
      "Step energy model of a rank: joules fixed, per batch token, per context token");
  MetricFamily samples =
      NewFamily("joule_step_cost_samples", MetricType::Gauge,
                "Measured steps behind the rank's cost model in use (its own or all ranks pooled)");
  MetricFamily caps = NewFamily(
      "joule_scheduler_step_token_cap", MetricType::Gauge,
      "Tokens per step the policy allows a rank now for a tier's TPOT target, by its learned "
      "step-time model (ipw; 0: uncapped)");
  static constexpr const char* kTerms[] = {"fixed", "per_batch_token", "per_context_token"};
  for (const scheduler::RankSnapshot& r : snapshot.ranks) {
    const std::string rank = absl::StrCat(r.rank);
    for (int i = 0; i < 3; ++i) {
      AddSample(&seconds, {{"rank", rank}, {"term", kTerms[i]}}, r.cost.time[i]);
      AddSample(&joules, {{"rank", rank}, {"term", kTerms[i]}}, r.cost.energy[i]);
    }
    AddSample(&samples, {{"rank", rank}}, static_cast<double>(r.cost.samples));
    for (scheduler::Tier t : scheduler::kAllTiers) {
      AddSample(&caps, {{"rank", rank}, {"tier", std::string(scheduler::TierName(t))}},
                static_cast<double>(r.step_token_cap[static_cast<int>(t)]));
    }
  }
  std::vector<MetricFamily> out;
  for (MetricFamily* f : {&attainment, &recent, &target, &outcomes, &queued, &dispatched, &seconds,
                          &joules, &samples, &caps}) {
    out.push_back(std::move(*f));
  }
  return out;
}

}  // namespace joule::http
