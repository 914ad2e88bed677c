#include "coordinator/http/cluster_metrics.h"

#include "coordinator/http/metric_families.h"

namespace joule::http {

namespace {

// Every rank's meter, from its heartbeats: one scrape of the coordinator shows
// the whole cluster's power and energy.
void AddEnergy(const cluster::MembershipStats& membership, std::vector<prometheus::MetricFamily>* out) {
  using prometheus::MetricType;
  prometheus::MetricFamily power = NewFamily(
      "joule_rank_power_watts", MetricType::Gauge,
      "Mean power of each rank over its last window of at least 1 s (heartbeats)");
  prometheus::MetricFamily energy = NewFamily(
      "joule_rank_energy_joules_total", MetricType::Counter,
      "Energy each rank's meter measured (or modelled: source) since the coordinator started");
  double total = 0;
  for (const cluster::RankInfo& r : membership.metered) {
    const std::vector<prometheus::ClientMetric::Label> labels = {
        {.name = "rank", .value = std::to_string(r.rank)}, {.name = "source", .value = r.energy_source}};
    AddSample(&power, labels, r.power_watts);
    AddSample(&energy, labels, r.energy_joules);
    total += r.energy_joules;
  }
  out->push_back(std::move(power));
  out->push_back(std::move(energy));
  out->push_back(NewFamily("joule_cluster_energy_joules_total", MetricType::Counter,
                           "Energy of every rank together since the coordinator started (heartbeats)"));
  AddSample(&out->back(), {}, total);
}

// Each rank's engine limits, which the scheduler plans within. 0 is unknown,
// so it gets no sample rather than a limit of zero.
void AddEngineLimits(const std::vector<cluster::RankInfo>& ranks, std::vector<prometheus::MetricFamily>* out) {
  using prometheus::MetricType;
  prometheus::MetricFamily running = NewFamily(
      "joule_rank_max_running", MetricType::Gauge,
      "Sequences each rank's worker runs at most (joule-worker --max-running, from its registration)");
  prometheus::MetricFamily tokens = NewFamily(
      "joule_rank_max_batch_tokens", MetricType::Gauge,
      "Tokens per step each rank's worker runs at most (joule-worker --max-batch-tokens, from its registration)");
  for (const cluster::RankInfo& r : ranks) {
    const std::vector<prometheus::ClientMetric::Label> labels = {{.name = "rank", .value = std::to_string(r.rank)}};
    if (r.max_running > 0) AddSample(&running, labels, r.max_running);
    if (r.max_batch_tokens > 0) AddSample(&tokens, labels, r.max_batch_tokens);
  }
  out->push_back(std::move(running));
  out->push_back(std::move(tokens));
}

}  // namespace

std::vector<prometheus::MetricFamily> ClusterMetricFamilies(const cluster::MembershipStats& membership,
                                                            const cluster::RouterStats& router,
                                                            const std::vector<cluster::RankInfo>& ranks) {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> out;
  auto add = [&out](const char* name, MetricType type, const char* help, double value) {
    out.push_back(NewFamily(name, type, help));
    AddSample(&out.back(), {}, value);
  };
  add("joule_membership_epoch", MetricType::Gauge,
      "Epoch of the expert-parallel group (1 as first formed; +1 per re-forming after a death)",
      static_cast<double>(membership.group_epoch));
  add("joule_rank_failures_total", MetricType::Counter, "Ranks marked dead",
      static_cast<double>(membership.rank_failures));
  add("joule_heartbeat_late_total", MetricType::Counter,
      "Ranks silent past the heartbeat limit that answered their status probe and were kept",
      static_cast<double>(membership.heartbeats_late));
  add("joule_requests_resumed_total", MetricType::Counter,
      "Request attempts started on a live rank after the rank serving them failed",
      static_cast<double>(router.requests_resumed));
  add("joule_resumed_tokens_total", MetricType::Counter,
      "Generated tokens recomputed as context by resumed attempts",
      static_cast<double>(router.resumed_tokens));
  add("joule_requests_waiting_to_resume", MetricType::Gauge,
      "Requests waiting for the expert-parallel group to serve again", router.parked);
  out.push_back(NewFamily("joule_recovery_seconds", MetricType::Histogram,
                          "Time from a group member's death to the re-formed group serving"));
  AddHistogram(&out.back(), {0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60}, membership.recovery_seconds);
  AddEnergy(membership, &out);
  AddEngineLimits(ranks, &out);
  if (membership.ep_load_imbalance > 0) {
    add("joule_ep_load_imbalance", MetricType::Gauge,
        "Busiest rank's expert work over the mean rank's, since the last rebalance (1: balanced)",
        membership.ep_load_imbalance);
  }
  return out;
}

}  // namespace joule::http
