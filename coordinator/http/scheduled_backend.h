// GenerationBackend that puts the scheduler (scheduler/scheduler.h) between
// the front door and the Router: requests are admitted into per-tier queues
// (RESOURCE_EXHAUSTED with a retry-after hint when a tier's queue is full ->
// 429), held until the policy dispatches them, and sent to the rank it chose
// with the step priority and token cap it set. Token arrivals and outcomes go
// back to the scheduler for SLO accounting.
//
// The steps workers report with their heartbeats go to Scheduler::OnStep, so
// the step cost model learns from the cluster's own telemetry. Each rank's
// engine limits (its worker's --max-running, --max-batch-tokens, reported at
// registration) go with the cluster view, so the scheduler plans the rank
// within them; a registration that caps the scheduler's config is logged.
//
// How each rank composes its steps travels as step plans: after dispatching,
// the loop asks the scheduler for every ready rank's StepLimits and sends the
// rank its order, preemptions and running limit (Router::SendStepPlan) when
// they changed: the order not just by requests ending, or a new preemption
// decision (each sent once). At most one plan per rank per kMinPlanInterval;
// none under fcfs, whose order is the engine's own. Preemptions the worker
// made go back to the scheduler (OnPreempted).
//
// One owned thread, the dispatch loop, runs Dispatch() after every event
// (admission, first token, outcome, step reports) and at the scheduler's
// NextWakeup().
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/cluster/membership.h"
#include "coordinator/cluster/router.h"
#include "coordinator/http/generation_backend.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "scheduler/scheduler.h"

namespace joule::http {

class ScheduledBackend final : public GenerationBackend {
 public:
  // Nothing is owned; all must outlive the backend. With a registry, the
  // time requests wait in the tier queues is observed in
  // joule_request_queue_time_seconds{tier}.
  ScheduledBackend(cluster::Router* router, cluster::Membership* membership,
                   scheduler::Scheduler* scheduler, prometheus::Registry* registry = nullptr);
  ~ScheduledBackend() override;  // Shutdown()

  // Stops the dispatch loop; requests still queued fail with UNAVAILABLE and
  // new ones are refused. Call before the router and membership go away.
  // Idempotent.
  void Shutdown();

  absl::Status Validate(const v1::GenerateRequest& request) const override;
  absl::Status Ready() const override;
  void GenerateAsync(const v1::GenerateRequest& request, absl::Time deadline,
                     std::shared_ptr<cluster::GenerateSink> sink,
                     std::function<void(absl::Status)> done) override;
  void Cancel(const std::string& request_id) override;

  // Plans to one rank go at most this often (a busy cluster changes its
  // order with every arrival and first token).
  static constexpr absl::Duration kMinPlanInterval = absl::Milliseconds(5);

 private:
  struct Queued {
    scheduler::Tier tier;
    v1::GenerateRequest request;
    absl::Time deadline;
    std::shared_ptr<cluster::GenerateSink> sink;
    std::function<void(absl::Status)> done;
    absl::Time queued_at;
  };
  class CountingSink;

  void Loop();
  void Wake();
  void Send(uint64_t id, int rank, Queued queued);
  scheduler::ClusterView View();  // dispatch loop only
  // Logs once per registration when `rank`'s worker allows less than the
  // scheduler's config asks for.
  void NoteEngineLimits(const cluster::RankInfo& rank);
  // Sends each ready rank its step plan when it changed (dispatch loop only).
  void SendStepPlans(const scheduler::ClusterView& view);

  // What the dispatch loop last sent a rank.
  struct RankPlan {
    std::vector<uint64_t> order;                  // scheduler ids
    absl::flat_hash_set<uint64_t> preempt_asked;  // decisions sent, until the scheduler drops them
    absl::Time sent_at = absl::InfinitePast();
  };

  cluster::Router* const router_;
  cluster::Membership* const membership_;
  scheduler::Scheduler* const scheduler_;
  std::array<prometheus::Histogram*, 4> queue_time_{};  // per tier; null without a registry

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool woken_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, Queued> queued_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, uint64_t> ids_ ABSL_GUARDED_BY(mu_);  // request_id -> id
  // Sent to a rank until their outcome: id -> request_id (plans name them so).
  absl::flat_hash_map<uint64_t, std::string> sent_ ABSL_GUARDED_BY(mu_);
  // Dispatch loop only.
  std::map<int, RankPlan> plans_;
  std::optional<absl::Time> plan_due_;  // when a plan held back by the interval may go
  // Per rank: the registration last noted (worker id, max_running, max_batch_tokens).
  std::map<int, std::tuple<std::string, int, int>> limits_noted_;
  std::thread loop_;
};

}  // namespace joule::http
