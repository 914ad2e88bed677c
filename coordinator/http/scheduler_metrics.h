// The scheduler's state as Prometheus metrics, read from
// Scheduler::Snapshot() at scrape time (served on the coordinator's /metrics
// next to the front door's HttpMetrics):
//   joule_slo_attainment{tier}           finished requests that met TTFT and TPOT / finished
//   joule_slo_recent_attainment{tier}    the same over the scheduler's recent window
//   joule_slo_attainment_target{tier}    the configured target
//   joule_slo_requests_total{tier,outcome}  attained, missed, rejected (429), cancelled
//   joule_scheduler_queued_requests{tier}   held at the coordinator, not yet on a rank
//   joule_scheduler_dispatched_requests{tier}  on a rank, no token yet
//   joule_step_cost_seconds{rank,term} / joule_step_cost_joules{rank,term}
//       the step cost model in use (term: fixed, per_batch_token, per_context_token)
//   joule_step_cost_samples{rank}        steps the model has learned from on that rank
#pragma once

#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "scheduler/scheduler.h"

namespace joule::http {

std::vector<prometheus::MetricFamily> SchedulerMetricFamilies(
    const scheduler::SchedulerSnapshot& snapshot);

class SchedulerMetrics final : public prometheus::Collectable {
 public:
  // Not owned; must outlive every scrape.
  explicit SchedulerMetrics(const scheduler::Scheduler* scheduler) : scheduler_(scheduler) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    return SchedulerMetricFamilies(scheduler_->Snapshot());
  }

 private:
  const scheduler::Scheduler* const scheduler_;
};

}  // namespace joule::http
