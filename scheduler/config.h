// Scheduler configuration: the policy, per-tier SLOs and queue caps, step
// limits, batch starvation bound and the ipw knobs. Read once from a JSON
// text (ParseSchedulerConfig); every field is optional and falls back to the
// defaults below, which suit a GPU cluster serving a mid-size MoE model.
//
//   {
//     "policy": "ipw",                 // "fcfs" | "priority" | "ipw"
//     "lockstep": true,                // expert parallel: all ranks step together
//     "max_batch_tokens": 512,         // tokens per step on one rank (fcfs/priority cap)
//     "max_running": 128,              // sequences in one rank's running batch
//     "max_inflight_per_rank": 4096,   // dispatched, unfinished requests per rank
//     "batch_max_wait_ms": 30000,      // starvation bound for batch work
//     "retry_after_ms": 1000,          // 429 hint when the drain rate is unknown
//     "tiers": {
//       "fast":     {"ttft_ms": 500,   "tpot_ms": 25,  "attainment": 0.99, "queue_cap": 64},
//       "priority": {"ttft_ms": 1000,  "tpot_ms": 50,  "attainment": 0.99, "queue_cap": 256},
//       "standard": {"ttft_ms": 2000,  "tpot_ms": 100, "attainment": 0.95, "queue_cap": 1024},
//       "batch":    {"ttft_ms": 60000, "tpot_ms": 0,   "attainment": 0.90, "queue_cap": 4096}
//     },
//     "ipw": {"safety": 0.9, "min_headroom": 0.05, "efficiency_slack": 0.25,
//             "valley_hold_ms": 15000, "pace": 0.8, "batch_token_interval_ms": 200,
//             "min_step_tokens": 16},
//     "prefix_affinity": {"enabled": true, "block_tokens": 16, "min_match_tokens": 32,
//                         "max_load_gap": 8, "index_blocks": 65536},
//     "calibration": [{"rank": 0, "batch_tokens": 64, "context_tokens": 2048,
//                      "duration_ms": 14.2, "energy_joules": 5.1}, ...]
//   }
//
// A target of 0 means "no target" (batch has no TPOT target by default).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "scheduler/cost_model.h"
#include "scheduler/tier.h"

namespace joule::scheduler {

enum class PolicyKind { kFcfs, kPriority, kIpw };

// "fcfs", "priority", "ipw"; anything else is InvalidArgument naming `field`.
absl::StatusOr<PolicyKind> ParsePolicyKind(std::string_view value,
                                           std::string_view field = "policy");
std::string_view PolicyName(PolicyKind kind);

struct TierSlo {
  absl::Duration ttft = absl::ZeroDuration();  // time to first token; 0 = no target
  absl::Duration tpot = absl::ZeroDuration();  // mean time per output token; 0 = no target
  double attainment = 0.99;                    // fraction of requests that must meet both
  int queue_cap = 1024;                        // waiting requests before 429
};

struct IpwOptions {
  // Fraction of the tightest TPOT the step-time budget aims at; the rest
  // absorbs cost-model error. Lowered automatically while a tier misses.
  double safety = 0.9;
  // Below this SLO headroom (1 - observed TPOT / target, worst running
  // request of a tier with a TPOT target) no batch work is added to steps.
  // Keep it below 1 - safety: that is the headroom the budget aims for.
  double min_headroom = 0.05;
  // Batch work that would run alone starts only once there is enough of it
  // for a step within this fraction of the best joules per token.
  double efficiency_slack = 0.25;
  // ...or until the oldest of it has waited this long: waiting longer risks
  // carrying it out of the valley into the next peak.
  absl::Duration valley_hold = absl::Seconds(15);
  // Pacing: a request needs a token only every pace * its tier's TPOT target
  // (batch: every batch_token_interval), not every step; ranks skip steps
  // while every running request is paced and not due, so tokens gather into
  // fewer, fuller steps (the fixed cost of a step is paid less often).
  // pace 0 turns pacing off.
  double pace = 0.8;
  // The step cap never goes below this many tokens: a prefill crawling a few
  // tokens per step costs more TTFT (and steps) than its TPOT protection
  // is worth.
  int min_step_tokens = 16;
  absl::Duration batch_token_interval = absl::Milliseconds(200);
};

// Routing for prefix-cache hits: a request goes to the rank believed to hold
// the longest prefix of its prompt (scheduler/prefix_index.h) instead of the
// policy's load-balanced choice, unless that rank is busier by more than
// max_load_gap requests in flight; then load wins (SGLang's router balances
// the same way).
struct PrefixAffinityOptions {
  bool enabled = true;
  int block_tokens = 16;      // the prefix granularity (the workers' --block-size)
  int min_match_tokens = 32;  // a shorter shared prefix does not move a request
  int max_load_gap = 8;
  int index_blocks = 65536;   // blocks the coordinator remembers (LRU)
};

struct CalibrationSample {
  int rank = 0;
  StepSample sample;
};

struct SchedulerConfig {
  PolicyKind policy = PolicyKind::kIpw;
  bool lockstep = true;
  // Per rank, each at most what the rank's worker reports (RankInfo.engine).
  int max_batch_tokens = 512;
  int max_running = 128;
  // Generous: each worker bounds its running batch itself (--max-running); this
  // only keeps one rank from absorbing unbounded work (1,000s of open streams).
  int max_inflight_per_rank = 4096;
  absl::Duration batch_max_wait = absl::Seconds(30);
  absl::Duration retry_after = absl::Seconds(1);
  std::array<TierSlo, 4> tiers = DefaultTierSlos();
  IpwOptions ipw;
  PrefixAffinityOptions prefix_affinity;
  std::vector<CalibrationSample> calibration;

  const TierSlo& slo(Tier t) const { return tiers[static_cast<int>(t)]; }
  TierSlo& slo(Tier t) { return tiers[static_cast<int>(t)]; }

  static std::array<TierSlo, 4> DefaultTierSlos();
  // InvalidArgument naming the field for out-of-range values.
  absl::Status Validate() const;
};

// Parses the JSON text above; errors name the field ("tiers.fast.tpot_ms").
// Unknown fields are errors too, so a typo does not silently keep a default.
absl::StatusOr<SchedulerConfig> ParseSchedulerConfig(std::string_view json_text);

// One "name=value" line per setting, for the start-up log.
std::string DescribeSchedulerConfig(const SchedulerConfig& config);

}  // namespace joule::scheduler
