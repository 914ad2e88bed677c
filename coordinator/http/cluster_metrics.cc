#include "coordinator/http/cluster_metrics.h"

#include "coordinator/http/metric_families.h"

namespace joule::http {

std::vector<prometheus::MetricFamily> ClusterMetricFamilies(const cluster::MembershipStats& membership,
                                                            const cluster::RouterStats& router) {
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
  return out;
}

}  // namespace joule::http
