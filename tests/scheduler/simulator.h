// A deterministic discrete-event simulation of an expert-parallel cluster
// driven by the Scheduler: N ranks step in lockstep (one step lasts as long
// as its slowest rank), each rank follows StepLimitsFor() the way the
// worker's engine will (budget in the given order, running sequences without
// budget skip the step, preemption frees a sequence for recompute), and the
// synthetic cost is known:
//   rank step time = a + b * tokens + c * context      (step = max over ranks)
//   energy         = P_active * step time per rank while stepping,
//                    P_idle per rank between steps.
// Every token, preemption, outcome and step goes back to the scheduler
// through its observation hooks, on a fake clock.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "scheduler/config.h"
#include "scheduler/tier.h"

namespace joule::scheduler::sim {

struct SimCost {
  double a_s = 12e-3;      // fixed per step: weights read once
  double b_s = 40e-6;      // per batch token
  double c_s = 20e-9;      // per context token attended over
  double p_active_w = 400;
  double p_idle_w = 100;
};

struct SimRequest {
  uint64_t id = 0;
  Tier tier = Tier::kStandard;
  double arrival_s = 0;
  int prompt = 0;
  int output = 0;
};

struct TierLoad {
  Tier tier = Tier::kStandard;
  double peak_rate = 0;    // requests per second while interactive traffic peaks
  double valley_rate = 0;  // ... and in the valleys between peaks
  int prompt_min = 0, prompt_max = 0;
  int output_min = 0, output_max = 0;
};

// Poisson arrivals whose rate alternates between peak and valley every
// `period_s / 2` seconds, over `duration_s`, from `seed`.
std::vector<SimRequest> MakeTrace(const std::vector<TierLoad>& loads, double duration_s,
                                  double period_s, uint64_t seed);

struct SimOptions {
  int ranks = 2;
  SimCost cost;
  int max_prefill_chunk = 256;
  // How often an idle cluster asks the scheduler again (deferred work).
  double idle_poll_s = 0.05;
};

struct TierResult {
  int64_t submitted = 0, rejected = 0, finished = 0, attained = 0, tpot_met = 0, ttft_met = 0;
  double attainment() const { return finished ? double(attained) / double(finished) : 1.0; }
  double max_queue_wait_s = 0;  // submit -> dispatch
  double max_ttft_s = 0;
  double mean_tpot_s = 0;
};

struct SimResult {
  std::array<TierResult, 4> tiers;
  int64_t output_tokens = 0;
  int64_t step_tokens = 0;  // including prefill and recompute
  int64_t steps = 0;
  int64_t preemptions = 0;
  double energy_j = 0;
  double makespan_s = 0;
  double busy_s = 0;
  double idle_w = 0;  // the cluster's idle power (all ranks)
  // Energy over [0, horizon_s]: after its last step the cluster idles on.
  // Compare policies over the same horizon, or the one that finishes later
  // pays idle power the others do not.
  double energy_until(double horizon_s) const {
    return energy_j + idle_w * std::max(0.0, horizon_s - makespan_s);
  }
  double tokens_per_joule(double horizon_s) const {
    const double e = energy_until(horizon_s);
    return e > 0 ? double(output_tokens) / e : 0;
  }
  const TierResult& tier(Tier t) const { return tiers[static_cast<int>(t)]; }
};

SimResult Simulate(const SchedulerConfig& config, const std::vector<SimRequest>& trace,
                   const SimOptions& options);

}  // namespace joule::scheduler::sim
