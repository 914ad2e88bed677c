// What a worker's step loop takes from the scheduler for its next step.
// Small and plain so it can travel to the worker in a proto message.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/time/time.h"

namespace joule::scheduler {

struct StepLimits {
  // Tokens this rank may put into the step (decodes plus prefill chunks).
  int64_t max_batch_tokens = 0;
  // Sequences in the rank's running batch.
  int max_running = 0;
  // Scheduling order: the engine gives the step's token budget to sequences
  // in this order, running and waiting alike (a waiting one is admitted when
  // its turn comes); sequences not listed follow in the engine's own order
  // (running oldest first, then waiting FCFS). A running sequence that gets
  // no budget simply skips the step and keeps its KV blocks. Empty = the
  // engine's own order (fcfs).
  std::vector<uint64_t> order;
  // Running sequences to preempt before planning (blocks freed, recomputed
  // later; the engine's per-sequence random stream keeps their output
  // unchanged). Only batch work under the ipw policy; lower tiers under
  // priority.
  std::vector<uint64_t> preempt;
  // The step time these limits aim for (InfiniteDuration when uncapped):
  // for logs and metrics.
  absl::Duration step_time_budget = absl::InfiniteDuration();
};

}  // namespace joule::scheduler
