// What the Worker gRPC service asks of a worker, in plain C++ (no gRPC or
// protobuf types): the adapter (worker_grpc_service.h) translates, the runtime
// (worker_runtime.h) implements, tests fake it.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/engine.h"

namespace joule::worker {

// The terminal outcome of one request: exactly one per accepted request.
struct RequestOutcome {
  absl::Status status;                        // not OK: the request failed with this error
  FinishReason finish = FinishReason::kNone;  // kStop, kLength or kCancelled when OK
  int prompt_tokens = 0;
  int completion_tokens = 0;  // generated here
  int resumed_tokens = 0;     // recomputed here for a resumed request
  int cached_tokens = 0;      // prompt tokens the prefix cache held (TokenOutput::cached_tokens)
  // This rank's metered energy charged to the request by its share of each
  // step's tokens (worker/telemetry/energy_attributor.h); 0 without a meter.
  double energy_joules = 0;
  std::string energy_source;  // the meter's source(); empty without one
};

// New tokens of a request, in order. With SamplingParams::logprobs one entry
// per token; with prompt_logprobs the prompt's entries, once, with the first.
struct TokenUpdate {
  std::vector<int32_t> tokens;
  std::vector<TokenLogprob> logprobs;
  std::vector<TokenLogprob> prompt_logprobs;
};

// Called from the worker's step loop: implementations must not block.
struct RequestCallbacks {
  std::function<void(const TokenUpdate& update)> on_tokens;
  std::function<void(const RequestOutcome& outcome)> on_done;  // last call
};

// The coordinator's plan for this rank's next steps (scheduler/step_limits.h),
// by request id: who gets the step's token budget first, which running
// requests to preempt once, and how many sequences may run at once.
struct StepPlan {
  uint64_t sequence = 0;  // > 0; a plan not newer than the one held is ignored
  std::vector<std::string> order;
  std::vector<std::string> preempt;
  int max_running = 0;  // 0: the engine's own limit
};
// How many of the plan's `preempt` were running here and were preempted
// (0 for a plan that was ignored as stale); an error when not serving.
using StepPlanDone = std::function<void(absl::StatusOr<int> preempted)>;

struct WorkerStatus {
  int rank = -1;
  bool ready = false;  // serving requests
  int running = 0;
  int waiting = 0;
  int64_t kv_free_blocks = 0;
  int64_t kv_total_blocks = 0;
  double kv_usage = 0;
  int64_t resident_bytes = 0;       // RSS of the process
  int64_t loaded_weight_bytes = 0;  // weights this rank holds (attention/dense + its experts)
  uint64_t steps = 0;               // lockstep rounds run
  // Since start, for the metrics (worker_metrics.h).
  uint64_t preemptions_total = 0;        // sequences preempted (KV freed, recomputed later)
  uint64_t scheduler_preemptions_total = 0;  // of those, asked for by a step plan
  uint64_t prompt_tokens_total = 0;      // prefill tokens computed (recomputes count again)
  uint64_t generation_tokens_total = 0;  // tokens sampled
  // Prefix caching: tokens of newly scheduled requests looked up, and those
  // the cache held; blocks whose content is cached (held or evictable).
  uint64_t prefix_cache_queries_total = 0;
  uint64_t prefix_cache_hits_total = 0;
  int64_t prefix_cache_blocks = 0;
  uint64_t placement_epoch = 0;
  // Energy since start from the worker's meter (see energy_attributor.h):
  // total = attributed (charged to requests) + idle (between steps) +
  // unattributed (steps without local tokens). Empty source: no meter.
  std::string energy_source;
  double energy_joules = 0;
  double energy_attributed_joules = 0;
  double energy_idle_joules = 0;
  double energy_unattributed_joules = 0;
  // Mean power over the last second or so of metered rounds (energy delta /
  // wall time, not an instant reading); 0 before the first window closes.
  double power_watts = 0;
  // The meter's own power reading (EnergyMeter::ReadPowerWatts: NVML's instant
  // field) when the last power window closed; < 0 where the meter has none.
  double power_instant_watts = -1;
  // The meter's own reading since the worker started (ReadEnergyMeter, filled
  // for /metrics only); < 0 without a meter or when a read failed.
  double energy_meter_joules = -1;
  int step_token_cap = 0;  // the cap the ranks agreed on (0: none)
  uint64_t group_epoch = 1;  // the expert-parallel group this rank serves in
  uint64_t regroups = 0;     // groups re-formed since start (a peer died)
  // Expert-parallel exchange since start (ExpertParallelExecutor::Stats):
  // payload bytes sent to other ranks and seconds spent in dispatch / combine.
  uint64_t dispatch_bytes_total = 0;
  uint64_t combine_bytes_total = 0;
  double dispatch_seconds_total = 0;
  double combine_seconds_total = 0;
  uint64_t two_batch_layers_total = 0;  // MoE layer calls run as two micro-batches
  uint64_t busy_steps = 0;  // rounds in which some rank had tokens (ran the MoE layers)
  // Tokens this rank routed to each expert since start, [layer][expert]
  // (empty rows for dense layers).
  std::vector<std::vector<int64_t>> expert_tokens_total;
  std::string error;                // why it stopped serving, when it did
};

class WorkerHandler {
 public:
  virtual ~WorkerHandler() = default;
  // Queues a request. On error nothing is queued and no callback runs:
  // Unavailable when not serving, AlreadyExists for a live request_id.
  // Invalid prompts or sampling reach on_done as InvalidArgument.
  virtual absl::Status Submit(const std::string& request_id, GenerationRequest request,
                              RequestCallbacks callbacks) = 0;
  // Cancels a queued or running request (its KV blocks are freed, on_done
  // reports kCancelled). False if no such request is live.
  virtual bool Cancel(const std::string& request_id) = 0;
  virtual WorkerStatus Status() = 0;
  // Holds `plan` for the steps to come (replacing an older one); `done` runs
  // once, after the step that applied it (from the step loop: it must not
  // block) or at once for a stale plan or an error. Request ids the worker
  // does not know are ignored (an order naming a request that arrives later
  // applies to it then).
  virtual void SetStepPlan(StepPlan /*plan*/, StepPlanDone done) {
    done(absl::UnimplementedError("this worker takes no step plans"));
  }
  // The energy meter read now, from the zero of the step loop's accounting;
  // nullopt without a meter. Apart from Status(), which every request and
  // heartbeat asks: only /metrics needs this read.
  virtual std::optional<double> ReadEnergyMeter() { return std::nullopt; }
};

}  // namespace joule::worker
