// The cluster's failures and recoveries as Prometheus metrics, read from the
// membership and the router at scrape time (served on the coordinator's
// /metrics next to HttpMetrics):
//   joule_membership_epoch              the expert-parallel group's epoch (1: as formed)
//   joule_rank_failures_total           ranks marked dead
//   joule_heartbeat_late_total          silent ranks kept: their status probe answered
//   joule_recovery_seconds              a member's death -> its group serving again
//   joule_requests_resumed_total        attempts started after a failed one
//   joule_resumed_tokens_total          tokens those attempts recomputed
//   joule_requests_waiting_to_resume    requests waiting for a serving group now
// and each rank's engine limits, as its worker registered them (no sample while
// unknown: no worker yet, or an older one that does not report them):
//   joule_rank_max_running{rank}        joule-worker --max-running
//   joule_rank_max_batch_tokens{rank}   joule-worker --max-batch-tokens
#pragma once

#include <vector>

#include "coordinator/cluster/membership.h"
#include "coordinator/cluster/router.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace joule::http {

// `ranks`: Membership::Ranks(), for the engine limits.
std::vector<prometheus::MetricFamily> ClusterMetricFamilies(const cluster::MembershipStats& membership,
                                                            const cluster::RouterStats& router,
                                                            const std::vector<cluster::RankInfo>& ranks);

class ClusterMetrics final : public prometheus::Collectable {
 public:
  // Not owned; both must outlive every scrape.
  ClusterMetrics(const cluster::Membership* membership, const cluster::Router* router)
      : membership_(membership), router_(router) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    return ClusterMetricFamilies(membership_->stats(), router_->stats(), membership_->Ranks());
  }

 private:
  const cluster::Membership* const membership_;
  const cluster::Router* const router_;
};

}  // namespace joule::http
