// The scheduler: per-tier queues with caps, a policy (fcfs, priority, ipw)
// that decides which queued request goes to which rank and when, and how
// each rank composes its next step; per-tier SLO accounting and the step
// cost model, both fed by observations.
//
// Pure: no I/O, no threads, time from the injected Clock. Thread-safe (one
// internal mutex), so the coordinator's request threads may Submit while its
// control loop Dispatches.
//
// Driving it (see docs/architecture.md, "Scheduling"):
//   coordinator request path   Submit() -> 429 with RetryAfter() when refused
//   coordinator control loop   Dispatch() after every event and at NextWakeup();
//                              send each Assignment's request to its rank
//   each step of rank r        StepLimitsFor(r) -> the engine's plan; then
//                              OnStep(r, sample) with the measured step
//   response stream            OnTokens(id, n) as tokens arrive, OnPreempted(id),
//                              OnMoved(id, rank) when it resumed on another rank,
//                              then exactly one of OnFinished(id) / OnCancelled(id)
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "scheduler/clock.h"
#include "scheduler/config.h"
#include "scheduler/cost_model.h"
#include "scheduler/prefix_index.h"
#include "scheduler/slo.h"
#include "scheduler/step_limits.h"
#include "scheduler/tier.h"

namespace joule::scheduler {

class Policy;
struct PolicyState;
struct Request;

struct RequestInfo {
  uint64_t id = 0;
  Tier tier = Tier::kStandard;
  int64_t prompt_tokens = 0;
  int64_t max_tokens = 0;
  // PrefixIndex::BlockHashes of the prompt (config.prefix_affinity.block_tokens),
  // for routing to a rank that holds its prefix; empty: no preference.
  std::vector<uint64_t> prefix_blocks;
};

// What a rank's worker allows itself (joule-worker --max-running,
// --max-batch-tokens); 0: unknown (an older worker). The scheduler plans the
// rank within the smaller of these and its config's.
struct EngineLimits {
  int max_running = 0;
  int max_batch_tokens = 0;
};

struct RankInfo {
  int rank = 0;
  bool ready = true;
  EngineLimits engine;
};

// The ranks that may take work now (from membership).
struct ClusterView {
  std::vector<RankInfo> ranks;
};

struct Assignment {
  uint64_t id = 0;
  int rank = 0;
  Tier tier = Tier::kStandard;
};

// Tokens of one measured step by tier, for energy attribution.
using TierTokens = std::array<int64_t, 4>;

struct TierSnapshot {
  Tier tier = Tier::kStandard;
  TierSlo slo;
  int64_t queued = 0;      // held by the scheduler
  int64_t dispatched = 0;  // on a rank, no token yet
  int64_t running = 0;     // producing tokens
  TierStats stats;
  double recent_attainment = 1.0;
};

struct RankSnapshot {
  int rank = 0;
  int64_t in_flight = 0;
  StepCostCoefficients cost;
  StepLimits last_limits;
  // StepTokenCapFor(rank, tier) now, by tier (0: uncapped).
  std::array<int64_t, 4> step_token_cap{};
};

struct SchedulerSnapshot {
  PolicyKind policy = PolicyKind::kIpw;
  std::array<TierSnapshot, 4> tiers;
  std::vector<RankSnapshot> ranks;
  double ipw_safety = 0;       // the step-time budget's fraction of the tightest TPOT
  double step_energy_joules = 0;
  int64_t step_tokens = 0;
};

// The retry-after hint carried by a RESOURCE_EXHAUSTED from Submit().
std::optional<absl::Duration> RetryAfter(const absl::Status& status);

class Scheduler {
 public:
  // `clock` is not owned and must outlive the scheduler. InvalidArgument for a
  // bad config (SchedulerConfig::Validate).
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(SchedulerConfig config,
                                                           const Clock* clock);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request. InvalidArgument naming the field for prompt_tokens < 1
  // or max_tokens < 1, AlreadyExists for an id still tracked, and
  // ResourceExhausted with a RetryAfter() hint when the tier's waiting
  // requests (queued here or dispatched without a first token) reach its cap.
  absl::Status Submit(const RequestInfo& request);

  // The requests to send now, and where. Each id is returned once; the
  // request then counts as in flight on that rank. Also takes each listed
  // rank's engine limits, for this and later decisions on that rank.
  std::vector<Assignment> Dispatch(const ClusterView& cluster);

  // The earliest time Dispatch() would decide differently with no new event
  // (a deferred batch request reaching its maximum wait), if any.
  std::optional<absl::Time> NextWakeup() const;

  // How `rank` should compose its next step (see step_limits.h).
  StepLimits StepLimitsFor(int rank);
  // The step size a request of `tier` needs on `rank` to meet its TPOT
  // target, by the cost model: what travels with the request to the worker
  // (GenerateRequest.step_token_cap), whose ranks keep every step within the
  // smallest cap of their live requests. 0: uncapped (only ipw caps).
  int64_t StepTokenCapFor(int rank, Tier tier);
  // How often a decoding request of `tier` needs a token (pacing, ipw only;
  // GenerateRequest.token_interval_us); zero: every step.
  absl::Duration TokenIntervalFor(Tier tier) const;

  // Observations. Unknown ids are ignored: a late message for a request that
  // already had its outcome changes nothing.
  void OnTokens(uint64_t id, int64_t count);  // the first call is the first token
  void OnPreempted(uint64_t id);              // back to waiting on its rank
  void OnFinished(uint64_t id);
  void OnCancelled(uint64_t id);  // also for failed requests: not an SLO outcome
  void OnStep(int rank, const StepSample& sample, const TierTokens& tier_tokens = {});
  // The rank is gone: its in-flight requests leave it (the router resumes
  // them on another rank, OnMoved, or fails them, OnCancelled) and it gets no
  // more work until it is ready in a ClusterView again.
  void OnRankLost(int rank);
  // The request now runs on `rank` (resumed there after its rank died).
  void OnMoved(uint64_t id, int rank);

  SchedulerSnapshot Snapshot() const;
  const SchedulerConfig& config() const { return config_; }

 private:
  Scheduler(SchedulerConfig config, const Clock* clock, std::unique_ptr<Policy> policy);
  void Forget(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  PolicyState StateLocked(absl::Time now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Duration RetryAfterLocked(Tier tier) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SchedulerConfig config_;
  const Clock* const clock_;

  mutable absl::Mutex mu_;
  std::unique_ptr<Policy> policy_ ABSL_GUARDED_BY(mu_);
  StepCostModel cost_ ABSL_GUARDED_BY(mu_);
  SloTracker slo_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Request>> requests_ ABSL_GUARDED_BY(mu_);
  // Held requests per tier, in submission order (key: submission sequence).
  std::array<std::map<uint64_t, Request*>, 4> queues_ ABSL_GUARDED_BY(mu_);
  // In-flight requests per rank, in submission order.
  std::map<int, std::map<uint64_t, Request*>> ranks_ ABSL_GUARDED_BY(mu_);
  std::map<int, StepLimits> last_limits_ ABSL_GUARDED_BY(mu_);
  std::map<int, EngineLimits> engine_limits_ ABSL_GUARDED_BY(mu_);  // from the last ClusterView
  PrefixIndex prefix_ ABSL_GUARDED_BY(mu_);
  // Per rank: when the last step was reported, and the mean time between
  // steps that was not step (lockstep agreement, streaming): TPOT pays it too.
  std::map<int, absl::Time> last_step_at_ ABSL_GUARDED_BY(mu_);
  std::map<int, double> step_gap_s_ ABSL_GUARDED_BY(mu_);
  // Requests dispatched per tier recently (EWMA rate), for retry-after hints.
  std::array<double, 4> start_rate_ ABSL_GUARDED_BY(mu_) = {};
  std::array<absl::Time, 4> last_start_ ABSL_GUARDED_BY(mu_);
  double step_energy_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t step_tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace joule::scheduler
