// WorkerRuntime: one expert-parallel rank's serving loop, without gRPC.
//
// One owned thread (the step loop) is the only user of the Engine, the
// Transport and the expert-parallel executor. Other threads talk to it through
// a queue that the loop drains between steps: new requests, cancellations,
// placements, and the coordinator's step plans (order, preemptions and running
// limit for the engine's StepDirectives, alongside the step cap the ranks
// agree on). The loop calls LockstepStepper::Step() continuously — every rank
// runs the same number of rounds, idle or not — and hands the new tokens to
// each request's callbacks.
//
// Every `control_interval` rounds the ranks also all-gather a small control
// record, so decisions that must take effect on every rank at the same step do:
//   - a new placement is applied once every rank has it ready (same epoch);
//   - a stop requested on any rank (SIGTERM, coordinator shutdown) stops all
//     ranks at the same round, failing their in-flight requests with a clear
//     error instead of leaving the peers to time out.
// A failed collective (peer died, timeout) fails every in-flight request with
// Unavailable "expert-parallel step failed: <reason>" and ends the loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/placement.h"
#include "scheduler/cost_model.h"
#include "worker/engine/engine.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/lockstep.h"
#include "worker/ep/transport.h"
#include "worker/model/model.h"
#include "worker/service/worker_handler.h"
#include "worker/telemetry/energy_attributor.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::worker {

struct RuntimeOptions {
  absl::Duration idle_wait = absl::Milliseconds(1);  // pause after a round nobody had work for
  // Longest pause while every rank's sequences rest (pacing) and not yet due.
  absl::Duration idle_wait_max = absl::Milliseconds(20);
  int control_interval = 4;                          // rounds between control all-gathers
  ep::ExpertParallelOptions expert_parallel;         // for executors built on placement changes
  // Meters this rank's energy (not owned; outlives the runtime). Null: no
  // energy accounting.
  telemetry::EnergyMeter* energy_meter = nullptr;
  // After a failed step (a peer died), wait this long for a new group
  // (InstallGroup) before failing every request; zero: fail at once.
  absl::Duration regroup_timeout = absl::ZeroDuration();
  // The expert-parallel group epoch the runtime starts in (a joiner's is > 1).
  uint64_t group_epoch = 1;
  // Fault injection (tests): every step in which this rank computes tokens
  // takes this much longer, plus per_token per token, as a slower device would.
  absl::Duration injected_step_delay = absl::ZeroDuration();
  absl::Duration injected_delay_per_token = absl::ZeroDuration();
};

// A placement ready to run on this rank. `weights` holds the experts the
// placement gives this rank when the weights in use do not; null when they do.
struct PreparedPlacement {
  uint64_t epoch = 0;
  Placement placement;
  std::unique_ptr<ModelWeights> weights;
};

// A new expert-parallel group for this rank (a peer died and the coordinator
// regrouped the survivors): its transport and placement.
struct NewGroup {
  uint64_t epoch = 0;
  ep::Transport* transport = nullptr;  // not owned; must outlive the runtime's use
  // The group's device transport for expert rows (NCCL's communicator under
  // `transport`), or null; replaces ExpertParallelDevice::row_transport.
  ep::Transport* row_transport = nullptr;
  PreparedPlacement placement;         // weights set when new experts were loaded
};

class WorkerRuntime : public WorkerHandler {
 public:
  // `model` and `transport` are not owned and must outlive the runtime; the
  // runtime owns the engine and the executor, installs the executor into the
  // model and creates the LockstepStepper. A null executor leaves the model's
  // local experts in place (a one-rank GPU worker: every expert on its device).
  WorkerRuntime(Model* model, ep::Transport* transport, std::unique_ptr<Engine> engine,
                std::unique_ptr<ep::ExpertParallelExecutor> executor, uint64_t placement_epoch,
                RuntimeOptions options = {});
  ~WorkerRuntime() override;  // Stop() and join

  // Starts the step loop.
  void Start();
  // Asks every rank to stop at the next control round; in-flight requests fail
  // with Unavailable "worker shutting down: <reason>". Idempotent.
  void Stop(const std::string& reason);
  // This rank left its group (drained, or the group went on without it): its
  // loop ends at its next round without telling the old group's peers, who
  // re-form without it (Stop would stop them all). In-flight requests fail as
  // with Stop; the exit status stays OK. Interrupt the transport after it.
  void Leave(const std::string& reason);
  // Blocks until the step loop has ended (after Stop, or a failed step).
  void Join();
  // Waits up to `timeout` for the loop to end; true if it has.
  bool WaitForExit(absl::Duration timeout);
  // OK after a clean stop; the error that ended the loop otherwise. Only
  // meaningful once the loop has ended.
  absl::Status exit_status() const;

  // WorkerHandler.
  absl::Status Submit(const std::string& request_id, GenerationRequest request,
                      RequestCallbacks callbacks) override;
  bool Cancel(const std::string& request_id) override;
  WorkerStatus Status() override;
  // The plan applies from the next step on; `done` runs after that step.
  void SetStepPlan(StepPlan plan, StepPlanDone done) override;
  std::optional<double> ReadEnergyMeter() override;

  // Hands over a placement (from the heartbeat); it is applied between steps
  // once every rank has the same epoch ready. A newer offer replaces an older
  // one not yet applied (keeping the older one's weights if the newer needs none).
  void OfferPlacement(PreparedPlacement placement);
  // Installs `group` once the step loop waits for one (after a failed step),
  // keeping every request and sequence: they continue in the new group. Blocks
  // until installed; FailedPrecondition when the loop has ended, DeadlineExceeded
  // when it did not get to it within `timeout`.
  absl::Status InstallGroup(NewGroup group, absl::Duration timeout);
  // Before Start: keeps `weights`, which the executor given to the
  // constructor uses (a worker that joined a running group loaded its experts
  // apart from the model's weights).
  void AdoptExpertWeights(std::unique_ptr<ModelWeights> weights);
  // Whether the loop waits for a new group (its last step failed).
  bool AwaitingGroup() const;

  // Tokens this rank routed to each expert since the last call, [layer][expert].
  std::vector<std::vector<int64_t>> TakeExpertLoad();
  // The steps with local tokens measured since the last call, oldest first;
  // at most kMaxStepSamples (the most recent) are kept between calls.
  std::vector<scheduler::StepSample> TakeStepSamples();
  static constexpr size_t kMaxStepSamples = 256;

 private:
  struct AddOp {
    uint64_t id;
    GenerationRequest request;
  };
  struct CancelOp {
    uint64_t id;
  };
  using Op = std::variant<AddOp, CancelOp>;
  struct Live {
    std::string request_id;
    RequestCallbacks callbacks;
    int prompt_tokens = 0;
    int completion_tokens = 0;
    int resumed_tokens = 0;
    int cached_tokens = 0;
  };
  struct OfferedPlan {
    StepPlan plan;
    StepPlanDone done;
  };
  // A plan handed to the engine, waiting for the step that applies it.
  struct AppliedPlan {
    std::vector<uint64_t> preempt;  // engine ids
    StepPlanDone done;
  };
  struct Control {  // all-gathered every control_interval rounds
    uint64_t ready_epoch;
    uint64_t stopping;
    int64_t step_token_cap;  // this rank's Engine::LocalStepTokenCap()
  };

  void Loop();
  enum class Round { kGo, kRegrouped, kEnd };
  // kEnd when the loop must end (error or agreed stop); kRegrouped when it
  // failed and the rank now serves in a new group (whose rounds start over).
  Round ControlRound();
  // After a failed step: waits for InstallGroup (up to regroup_timeout) and
  // switches to the new group; false when none came (the loop then fails
  // every request).
  bool WaitForGroup(const absl::Status& failure);
  // After Leave: fails the in-flight requests; true when the loop must end.
  bool EndIfLeft();
  // A new executor for `placement` over `transport` (the runtime's current
  // weights unless the placement brought its own).
  std::unique_ptr<ep::ExpertParallelExecutor> MakeExecutor(PreparedPlacement& placement,
                                                           ep::Transport* transport);
  // Installs `executor` in place of the current (non-null) one, keeping its stats.
  void ReplaceExecutor(std::unique_ptr<ep::ExpertParallelExecutor> executor);
  void Drain();
  // Takes the plans that arrived (and, when requests were added, resolves
  // the held plan's order again: it may name them) into the engine's directives.
  void TakeStepPlans(bool added);
  // Hands the engine the agreed step cap, the held plan and `preempt`.
  void ApplyStepDirectives(std::vector<uint64_t> preempt);
  // After a step: answers the plans it applied (how many of their
  // preemptions it made).
  void AnswerStepPlans(const StepResult& step);
  void Deliver(const StepResult& step);
  // False (loop ends) when this rank cannot run the agreed placement.
  bool ApplyPlacement(uint64_t epoch);
  void AccumulateExpertLoad();
  // Charges the round's energy to the requests that had tokens in it and
  // records the step for the cost model.
  void AttributeEnergy(const ep::LockstepStepper::Result& round, absl::Duration took);
  // The step for the cost model when energy is not metered.
  void RecordStep(const StepResult& step, absl::Duration took, double joules);
  // Sleeps RuntimeOptions' injected delay after a step with tokens of this rank.
  void InjectDelay(const StepResult& step) const;
  void PublishStatus();
  // Ends every live and queued request with `status` and stops serving.
  void FailAll(const absl::Status& status);
  void Finish(uint64_t id, const RequestOutcome& outcome);

  Model* const model_;
  ep::Transport* transport_;  // replaced by a new group (loop thread only)
  const RuntimeOptions options_;
  // Its device transport for expert rows (NewGroup::row_transport; loop thread only).
  ep::Transport* row_transport_;
  // Step-loop state.
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ModelWeights> expert_weights_;  // weights of a reloaded placement, if any
  std::unique_ptr<ep::ExpertParallelExecutor> executor_;
  ep::ExpertParallelExecutor::Stats retired_ep_stats_;  // of executors replaced by placements
  ep::LockstepStepper stepper_;
  std::unique_ptr<telemetry::EnergyAttributor> attributor_;  // null without a meter
  absl::flat_hash_map<uint64_t, Live> live_;
  // The step plan held (the newest applied): order by request id, resolved to
  // engine ids whenever it or the requests change.
  std::vector<std::string> plan_order_;
  int plan_max_running_ = 0;
  int step_cap_ = 0;  // the cap the ranks agreed on in the last control round
  std::vector<AppliedPlan> applied_plans_;  // answered after the next step
  std::optional<PreparedPlacement> candidate_;  // the placement this rank reports ready
  uint64_t rounds_ = 0;
  uint64_t applied_epoch_;
  std::thread loop_;
  absl::Notification exited_;
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> left_{false};  // Leave: stop without announcing it

  mutable absl::Mutex mu_;
  std::deque<Op> inbox_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Live> accepted_ ABSL_GUARDED_BY(mu_);  // not yet taken by the loop
  absl::flat_hash_map<std::string, uint64_t> ids_ ABSL_GUARDED_BY(mu_);  // live request_id -> id
  uint64_t plan_sequence_ ABSL_GUARDED_BY(mu_) = 0;  // of the newest plan accepted
  std::vector<OfferedPlan> offered_plans_ ABSL_GUARDED_BY(mu_);  // oldest first; not yet taken
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  std::string stop_reason_ ABSL_GUARDED_BY(mu_);
  absl::Status exit_status_ ABSL_GUARDED_BY(mu_);
  std::optional<PreparedPlacement> offered_ ABSL_GUARDED_BY(mu_);
  bool awaiting_group_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<NewGroup> pending_group_ ABSL_GUARDED_BY(mu_);
  uint64_t groups_installed_ ABSL_GUARDED_BY(mu_) = 0;
  WorkerStatus status_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<int64_t>> expert_load_ ABSL_GUARDED_BY(mu_);
  std::deque<scheduler::StepSample> step_samples_ ABSL_GUARDED_BY(mu_);
  // Power window: energy total and wall time when the current one opened.
  double power_window_joules_ = 0;
  absl::Time power_window_start_ = absl::InfinitePast();
};

}  // namespace joule::worker
