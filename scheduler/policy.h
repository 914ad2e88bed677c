// The policy seam inside the scheduler: a Policy reads the scheduler's state
// (queues, in-flight requests per rank, cost model, SLO stats) and returns
// decisions; the Scheduler applies them. Internal to the library: callers
// use scheduler.h and pick a policy by name in the config.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/time/time.h"
#include "scheduler/config.h"
#include "scheduler/cost_model.h"
#include "scheduler/prefix_index.h"
#include "scheduler/scheduler.h"
#include "scheduler/slo.h"
#include "scheduler/step_limits.h"

namespace joule::scheduler {

// One request the scheduler tracks from Submit until its outcome.
struct Request {
  enum class State { kQueued, kDispatched, kRunning };
  RequestInfo info;
  uint64_t seq = 0;  // submission order
  State state = State::kQueued;
  absl::Time submitted;
  absl::Time dispatched;
  std::optional<absl::Time> first_token;
  absl::Time last_token;
  int64_t generated = 0;
  int rank = -1;
  int preemptions = 0;
  // Dispatched because it waited the batch maximum: goes first, never preempted.
  bool starved = false;
  // Prompt tokens its rank is believed to hold in its prefix cache (set at
  // dispatch): prefill it need not compute.
  int64_t cached_tokens = 0;

  Tier tier() const { return info.tier; }
  // Context the sequence attends over now.
  int64_t context() const { return info.prompt_tokens + generated; }
};

using Queues = std::array<std::map<uint64_t, Request*>, 4>;
using RankRequests = std::map<int, std::map<uint64_t, Request*>>;

struct PolicyState {
  absl::Time now;
  const SchedulerConfig* config = nullptr;
  const StepCostModel* cost = nullptr;
  const SloTracker* slo = nullptr;
  const Queues* queues = nullptr;
  const RankRequests* ranks = nullptr;  // in flight, every rank that ever had work
  const std::map<int, double>* step_gap_s = nullptr;
  const PrefixIndex* prefix = nullptr;
  const std::map<int, EngineLimits>* engine_limits = nullptr;  // per rank; absent: unknown
};

class Policy {
 public:
  virtual ~Policy() = default;
  virtual PolicyKind kind() const = 0;
  // Requests to send now. `ready` lists the ranks that may take work.
  virtual std::vector<Assignment> Dispatch(const PolicyState& state,
                                           const std::vector<int>& ready) = 0;
  virtual StepLimits Limits(const PolicyState& state, int rank) = 0;
  // Tokens per step under which a request of `tier` running on `rank` meets
  // its TPOT target; 0: no cap (the policy does not cap steps, or the tier
  // has no TPOT target).
  virtual int64_t StepTokenCap(const PolicyState& /*state*/, int /*rank*/, Tier /*tier*/) {
    return 0;
  }
  // How often a decoding request of `tier` needs a token (pacing); zero: every step.
  virtual absl::Duration TokenInterval(Tier /*tier*/) const { return absl::ZeroDuration(); }
  // Feedback from finished requests (ipw adapts its safety margin).
  virtual void OnFinished(Tier /*tier*/, bool /*attained*/, bool /*tpot_ok*/) {}
  virtual double safety() const { return 0; }
};

std::unique_ptr<Policy> MakePolicy(const SchedulerConfig& config);

// Shared helpers for the policies.
namespace policy_internal {

// True once a held batch request has waited the configured maximum.
bool Starved(const PolicyState& s, const Request& r);
// The ready rank with the fewest in-flight requests below the per-rank cap
// (ties: lower rank); nullopt when every ready rank is full.
std::optional<int> LeastLoaded(const PolicyState& s, const std::vector<int>& ready,
                               const std::map<int, int64_t>& added);
int64_t InFlight(const PolicyState& s, int rank);
// The config's max_running / max_batch_tokens, lowered to what `rank`'s
// worker allows: what every per-rank decision must plan within.
int MaxRunning(const PolicyState& s, int rank);
int MaxBatchTokens(const PolicyState& s, int rank);
// Prompt tokens of `r` that `rank` is believed to hold in its prefix cache.
int64_t CachedOn(const PolicyState& s, const Request& r, int rank);
// Routing for prefix-cache hits (config.prefix_affinity): the ready rank
// holding the longest prefix of r's prompt instead of the policy's `chosen`,
// while it has room and is at most max_load_gap requests busier; else `chosen`.
std::optional<int> PreferCached(const PolicyState& s, const Request& r,
                                const std::vector<int>& ready,
                                const std::map<int, int64_t>& added, std::optional<int> chosen);

}  // namespace policy_internal
}  // namespace joule::scheduler
