// Cluster membership: which worker holds which rank, whether it is alive and
// ready, the rendezvous of transport addresses, the current expert placement
// and the per-expert load that EPLB rebalances from.
//
// Plain C++ (proto messages in and out, no gRPC); thread-safe. Time comes from
// an injected Clock so heartbeat expiry is testable; Rendezvous waits against a
// real deadline because it blocks an RPC.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/placement.h"
#include "coordinator/cluster/clock.h"
#include "coordinator/cluster/model_summary.h"
#include "proto/joule/v1/cluster.pb.h"
#include "scheduler/cost_model.h"

namespace joule::cluster {

enum class RankState {
  kFree,        // nobody registered for it yet
  kRegistered,  // registered, loading weights or connecting its transport
  kReady,       // heartbeats say ready
  kDead,        // heartbeats stopped or its endpoint is unreachable; see dead_reason
};
std::string_view RankStateName(RankState state);  // "free", "registered", "ready", "dead"

struct MembershipOptions {
  int world_size = 1;
  std::string model_dir;          // for error messages
  std::string model_fingerprint;  // common/model_fingerprint.h
  v1::TransportKind transport = v1::TRANSPORT_KIND_UCX;
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  int heartbeat_misses = 3;   // dead after this many intervals without a heartbeat
  // A registered rank that has not heartbeated yet is loading weights or
  // waiting at the rendezvous (whose calls also count as signs of life); it is
  // dead when silent this long.
  absl::Duration startup_timeout = absl::Minutes(10);
  int redundant_experts = 0;  // Rebalance() default
  absl::Duration step_timeout = absl::Seconds(10);  // told to workers at registration
  // A member that dies leaves the expert-parallel group: the survivors form a
  // new one (a new group epoch) and serve on. False: the group stays broken
  // until every rank is back (the behaviour before elastic groups).
  bool elastic = true;
};

struct RankInfo {
  int rank = 0;
  RankState state = RankState::kFree;
  std::string worker_id;
  std::string worker_endpoint;
  std::string host;
  std::string device;
  // Its worker's engine limits (RegisterRequest, from joule-worker
  // --max-running, --max-batch-tokens), replaced at each registration; 0: unknown.
  int max_running = 0;
  int max_batch_tokens = 0;
  int running = 0;
  int waiting = 0;
  double kv_usage = 0;
  uint64_t placement_epoch = 0;  // the placement the worker last said it runs
  std::string dead_reason;
  int group_rank = -1;           // its transport rank in the current group; -1: not a member
  uint64_t group_epoch = 0;      // the group the worker last said it serves in
  // Its energy meter, from heartbeats: joules metered on this rank since the
  // coordinator started (summed over the workers that held it, so it only
  // grows), the last mean power, and the meter ("" before the first report).
  double energy_joules = 0;
  double power_watts = 0;
  std::string energy_source;
};

// The expert-parallel group: the registered ranks that step together, in
// transport-rank order. A new epoch opens when a member dies.
struct GroupInfo {
  uint64_t epoch = 0;        // 0: not formed yet
  std::vector<int> members;  // registered ranks, by transport rank
  // Every member is ready and serves in this epoch: requests can run.
  bool serving = false;
  std::string reason;        // why the last epoch opened
};

// Failures and recoveries so far, for /metrics.
struct MembershipStats {
  uint64_t group_epoch = 0;
  uint64_t rank_failures = 0;            // ranks marked dead
  uint64_t heartbeats_late = 0;          // suspects kept because their status probe answered
  std::vector<double> recovery_seconds;  // a member's death -> its group serving again
  // Every rank that reported a meter: energy, power, source (RankInfo's fields).
  std::vector<RankInfo> metered;
  // LoadImbalance of the current placement over the expert load reported since
  // the last rebalance; 0: no load yet.
  double ep_load_imbalance = 0;
};

struct DeadRank {
  int rank = 0;
  std::string reason;  // "heartbeat lost (none for 1600 ms, limit 3 x 500 ms)"
};

// A rank silent past half the heartbeat limit. Late heartbeats (an overloaded
// host) look the same as a dead worker, so it is dead only once a status probe
// of its worker fails: KeepSuspect or SuspectDead with the probe's outcome,
// judged once the rank is silent past the whole limit. Probing from half the
// limit on lets a frozen worker's probe time out by then.
struct SuspectRank {
  int rank = 0;
  uint64_t probe = 0;  // names this suspicion: the outcome of an older one changes nothing
  std::string worker_id;        // the holder suspected: a later holder is not judged by it
  std::string worker_endpoint;  // where to probe
};

struct HeartbeatExpiry {
  std::vector<DeadRank> dead;          // marked dead now
  std::vector<SuspectRank> suspects;   // to probe
};

class Membership {
 public:
  // The initial placement is contiguous sharding over the model's MoE layers.
  static absl::StatusOr<std::unique_ptr<Membership>> Create(MembershipOptions options,
                                                            ModelSummary model, const Clock* clock);

  // Refusals carry a status code and a message naming the problem: wrong
  // protocol version or model fingerprint or transport (FAILED_PRECONDITION),
  // rank out of range, missing fields or negative engine limits
  // (INVALID_ARGUMENT), rank held by a live worker (ALREADY_EXISTS), cluster
  // full (RESOURCE_EXHAUSTED). A worker that
  // registers again with the same worker_id gets its rank back. Every
  // registration gets a new random worker_secret in the reply.
  absl::Status Register(const v1::RegisterRequest& request, v1::RegisterReply* reply);

  // Records the caller's transport address (when set, it replaces the one
  // given at registration: a UCX address is made for a known rank), waits
  // until every rank is held by a live worker whose address is known (UCX) and,
  // for NCCL, rank 0 has sent its unique id, then lists every rank's
  // addresses. DEADLINE_EXCEEDED naming the missing ranks when `deadline`
  // passes first. With request.group_epoch set, the same for that group: the
  // members' addresses for it, by transport rank; ABORTED when the group has
  // moved on to a later epoch, FAILED_PRECONDITION when the caller is not a
  // member. PERMISSION_DENIED when the worker_secret is not the one issued
  // to the rank's registration.
  absl::Status Rendezvous(const v1::RendezvousRequest& request, absl::Time deadline,
                          v1::RendezvousReply* reply);

  // Records liveness, load and per-expert token counts; the reply carries the
  // current placement when the worker runs an older one. NOT_FOUND when the
  // worker does not hold that rank (it should register again). A rank marked
  // dead whose worker heartbeats again is alive again. PERMISSION_DENIED,
  // changing nothing, when the worker_secret is not the rank's.
  // Its measured steps go to the step observer, if one is set.
  absl::Status Heartbeat(const v1::HeartbeatRequest& request, v1::HeartbeatReply* reply);

  // Receives each heartbeat's measured steps (oldest first) with the rank:
  // what the scheduler's step cost model learns from. Called on the
  // heartbeat's RPC thread, without the membership lock held.
  using StepObserver = std::function<void(int rank, const std::vector<scheduler::StepSample>&)>;
  void SetStepObserver(StepObserver observer);

  // Ranks without a heartbeat for more than half of heartbeat_misses *
  // heartbeat_interval (the limit) become suspects, one probe at a time per
  // rank (a heartbeat clears the suspicion). A probe that ended before the
  // limit is judged here once the limit passes (see KeepSuspect and
  // SuspectDead). Marked dead at once: a rank silent past startup_timeout
  // before its first heartbeat, and one still silent a whole limit after its
  // probe kept it (it answers RPCs but its heartbeats do not arrive). Returns
  // those newly marked and the new suspects.
  HeartbeatExpiry ExpireHeartbeats();
  // The suspect's worker answered its status probe: the rank stays, and gets
  // one more heartbeat limit from when it is judged (now, or once silent past
  // the limit). False when `suspect` is no longer the rank's open suspicion (a
  // heartbeat came, or it registered again).
  bool KeepSuspect(const SuspectRank& suspect);
  // The suspect's status probe failed: marks it dead, the reason ending in
  // "; status probe: <error>" — now when silent past the limit or `gone`
  // (nothing listens at its endpoint any more: the process is gone, so no
  // late heartbeat can come), else the ExpireHeartbeats call after the limit
  // (nullopt here). Nullopt too when `suspect` is no longer the rank's open
  // suspicion.
  std::optional<DeadRank> SuspectDead(const SuspectRank& suspect, const absl::Status& error,
                                      bool gone = false);
  // Marks `rank` dead (e.g. its endpoint stopped answering). False when it was
  // not held by a live worker.
  bool MarkDead(int rank, const std::string& reason);

  // Replaces the placement by contiguous sharding plus `redundant_experts`
  // replicas per MoE layer of the experts that received the most tokens since
  // the last rebalance (coordinator/placement/eplb.h), bumps the epoch (workers
  // get it with their next heartbeat) and resets the load counters.
  // Absent: options.redundant_experts.
  absl::StatusOr<uint64_t> Rebalance(std::optional<int> redundant_experts);

  // Takes `rank` out of the group gracefully (elastic groups only): the next
  // epoch opens without it and its worker's heartbeats are answered with a
  // clean shutdown. Returns that epoch. FAILED_PRECONDITION when groups are
  // not elastic, the rank is not a member, or it is the last one;
  // INVALID_ARGUMENT when out of range.
  absl::StatusOr<uint64_t> Drain(int rank);

  // Wakes Rendezvous waiters and refuses new registrations.
  void Shutdown();

  int world_size() const { return options_.world_size; }
  GroupInfo group() const;
  MembershipStats stats() const;
  const ModelSummary& model() const { return model_; }
  std::vector<RankInfo> Ranks() const;
  uint64_t placement_epoch() const;
  Placement placement() const;
  // Tokens per expert since the last rebalance: [layer][expert], empty for dense layers.
  std::vector<std::vector<int64_t>> expert_load() const;

 private:
  struct Slot {
    RankInfo info;
    std::string transport_address;
    absl::Time last_seen;       // last heartbeat (or registration / rendezvous call)
    // When a status probe last kept it while silent; after last_seen: no
    // heartbeat since.
    absl::Time kept_at = absl::InfinitePast();
    uint64_t probe = 0;         // the open suspicion's probe; 0: none
    // The open probe's outcome, waiting for the limit: OK when it answered.
    std::optional<absl::Status> probe_outcome;
    bool heartbeated = false;  // since registering
    bool joining = false;      // registered into a running group it is not in yet
    bool drained = false;      // taken out by Drain: its worker exits cleanly
    // RegisterReply.worker_secret of the registration holding the rank: its
    // Rendezvous and Heartbeat calls must carry it.
    std::string worker_secret;
    // The meter total its worker last reported (HeartbeatRequest.energy_joules):
    // the next report adds only what grew since.
    double energy_reported = 0;
  };

  Membership(MembershipOptions options, ModelSummary model, const Clock* clock, Placement initial);
  bool Live(const Slot& s) const { return s.info.state == RankState::kRegistered || s.info.state == RankState::kReady; }
  bool FormedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status HeartbeatLocked(const v1::HeartbeatRequest& request, v1::HeartbeatReply* reply)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string MissingRanksLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecordEnergyLocked(const v1::HeartbeatRequest& request, Slot* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FillRegisterReplyLocked(int rank, v1::RegisterReply* reply) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status GroupRendezvousLocked(const v1::RendezvousRequest& request, absl::Time deadline,
                                     v1::RendezvousReply* reply) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `rank` died: with elastic groups, a new group of the live members opens.
  void MemberDiedLocked(int rank, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The next group epoch: `members` (by rank), contiguous placement over them.
  void OpenGroupLocked(std::vector<int> members, std::string reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The placement for the group just opened, from the group `before` it.
  absl::Status PlaceOverGroupLocked(const std::vector<int>& before) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int GroupRankLocked(int rank) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // OK when `worker_id` holds `s` and `secret` is its registration's;
  // NOT_FOUND (register again) or PERMISSION_DENIED otherwise.
  absl::Status CheckHolderLocked(const Slot& s, const std::string& worker_id,
                                 const std::string& secret, absl::string_view next_step) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ServingLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // "heartbeat lost (none for X ms, limit N x I ms)".
  std::string HeartbeatLostReason(absl::Duration silent) const;
  std::string ProbeFailedReason(absl::Duration silent, const absl::Status& error) const;
  absl::Duration HeartbeatLimit() const {
    return options_.heartbeat_interval * options_.heartbeat_misses;
  }
  // A live rank's silence: the dead reason when it must die now; else maybe
  // opens a suspicion (appended to `suspects`) or keeps a probed one.
  std::optional<std::string> JudgeSilenceLocked(Slot* s, absl::Time now,
                                                std::vector<SuspectRank>* suspects)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Its probe answered and it is silent past the limit: one more limit.
  void KeepLocked(Slot* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks `s` dead with `reason` and logs it; MemberDiedLocked re-forms the group.
  void MarkDeadLocked(Slot* s, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The slot whose open suspicion `suspect` is; null when none is.
  Slot* SuspectLocked(const SuspectRank& suspect) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const MembershipOptions options_;
  const ModelSummary model_;
  const Clock* const clock_;
  Placement base_ ABSL_GUARDED_BY(mu_);  // contiguous over the group: what Rebalance adds replicas to

  mutable absl::Mutex mu_;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  Placement placement_ ABSL_GUARDED_BY(mu_);
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<std::vector<int64_t>> load_ ABSL_GUARDED_BY(mu_);
  bool rank0_rendezvous_ ABSL_GUARDED_BY(mu_) = false;
  std::string nccl_unique_id_ ABSL_GUARDED_BY(mu_);
  uint64_t group_epoch_ ABSL_GUARDED_BY(mu_) = 0;  // 0: not formed yet
  std::vector<int> group_ ABSL_GUARDED_BY(mu_);    // members' ranks, by transport rank
  std::vector<std::string> group_addresses_ ABSL_GUARDED_BY(mu_);  // this epoch's, by transport rank
  std::string group_reason_ ABSL_GUARDED_BY(mu_);
  // Set while a re-formed group does not serve yet: when the first death was seen.
  std::optional<absl::Time> recovering_since_ ABSL_GUARDED_BY(mu_);
  uint64_t rank_failures_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t heartbeats_late_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_probe_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<double> recovery_seconds_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  StepObserver step_observer_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::cluster
