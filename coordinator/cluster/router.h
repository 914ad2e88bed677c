// Request routing for data-parallel attention: validates a token-id request,
// picks the least loaded ready rank, relays that worker's Generate stream to
// the client and gives every request exactly one outcome (finished, cancelled
// or a clear error). Client cancellation cancels the worker call, so the
// worker frees the sequence's KV blocks.
//
// A request whose rank dies (or whose step fails with its group) is resumed:
// the router keeps the tokens it relayed, waits for a serving group (an
// elastic group re-forms without the dead rank, membership.h) and sends the
// request again with those tokens as resumed_token_ids, so the new rank
// recomputes them and streams only what follows. The client sees one stream
// with nothing repeated or missing. A request fails only when its resume limit
// is reached, no rank is left, or no group serves again within resume_wait.
//
// Asynchronous: a request holds no thread while it waits on its worker; its
// responses are relayed from the worker client's callbacks (gRPC's threads).
//
// Plain C++: the adapters (coordinator_service.h, the HTTP front door) supply
// a GenerateSink.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/cluster/endpoint_probe.h"
#include "coordinator/cluster/membership.h"
#include "coordinator/cluster/worker_client.h"
#include "proto/joule/v1/generate.pb.h"

namespace joule::cluster {

// Where a request's responses go.
class GenerateSink {
 public:
  virtual ~GenerateSink() = default;
  // False when the client has gone away.
  virtual bool Write(const v1::GenerateResponse& response) = 0;
  // True once the client cancelled or disconnected; safe from any thread.
  virtual bool ClientGone() const = 0;
};

struct RouterOptions {
  // Upper bound on one request's worker call (the client's deadline may be shorter).
  absl::Duration request_timeout = absl::Minutes(10);
  // Deadline of the Status probe that tells an unreachable worker from a failed request.
  absl::Duration probe_timeout = absl::Seconds(1);
  // Times one request may resume on another attempt after its rank failed
  // (--max-resumes); 0 fails it at once with the reason.
  int max_resumes = 0;
  // How long a request waits for a group that serves (to resume, or to start
  // while the group re-forms) before it fails with UNAVAILABLE.
  absl::Duration resume_wait = absl::Seconds(60);
  // Deadline of a step plan (SendStepPlan); the worker answers after its next step.
  absl::Duration step_plan_timeout = absl::Seconds(2);
  // Whether nothing listens at a silent rank's endpoint once its status probe
  // found it unreachable (EndpointRefuses): then it is dead at once, not at
  // the heartbeat limit. Null: always judged at the limit (tests inject one).
  std::function<bool(const std::string& endpoint)> endpoint_refuses = [](const std::string& e) {
    return EndpointRefuses(e, absl::Milliseconds(200));
  };
};

// The scheduler's plan for one rank's next steps (scheduler/step_limits.h),
// naming requests by the ids they were started with.
struct RankStepPlan {
  std::vector<std::string> order;    // who gets the step's token budget first
  std::vector<std::string> preempt;  // running requests to preempt once
  int max_running = 0;               // 0: the worker's own limit
};

// What the router did, for /metrics.
struct RouterStats {
  uint64_t requests_resumed = 0;    // attempts started after a failed one
  uint64_t resumed_tokens = 0;      // tokens those attempts had to recompute
  int parked = 0;                   // requests waiting for a serving group now
};

class Router {
 public:
  Router(Membership* membership, WorkerClientFactory* clients, RouterOptions options);
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // INVALID_ARGUMENT naming the field: empty prompt, token ids outside the
  // vocabulary, max_tokens <= 0, prompt + max_tokens beyond the model's
  // context, bad sampling values or service tier.
  absl::Status Validate(const v1::GenerateRequest& request) const;

  // The least loaded ready rank: load = max(requests in flight there,
  // running + waiting from its last heartbeat); ties go to the lower KV usage,
  // then the lower rank. UNAVAILABLE "no worker is ready" when the cluster has
  // not formed or no rank is ready, and with the reason when a rank is dead
  // (expert-parallel ranks serve only together) or the group re-forms.
  absl::StatusOr<int> PickRank() const;

  // OK when a request would be served: a rank can take it now, or (with
  // resumes on) the group is re-forming after a death and it will wait.
  absl::Status Ready() const;

  // Starts serving `request` and returns at once. Responses go to sink->Write on
  // gRPC's threads, one at a time for a given request; `done` runs exactly once,
  // after the last Write, with the outcome (OK when finished or cancelled by the
  // client, else the error, same statuses as Generate). `sink` is kept alive by the
  // router until `done` has run. Validation errors also arrive through `done`
  // (then before GenerateAsync returns, so `done` must not take a lock that the
  // caller holds around GenerateAsync). Neither Write nor `done` may block.
  void GenerateAsync(const v1::GenerateRequest& request, absl::Time client_deadline,
                     std::shared_ptr<GenerateSink> sink, std::function<void(absl::Status)> done);

  // GenerateAsync on the rank a scheduler chose (scheduler/scheduler.h)
  // instead of the least loaded one. The cluster must still be ready
  // (PickRank's errors apply); a rank outside it or not ready is UNAVAILABLE.
  void GenerateAsyncOnRank(int rank, const v1::GenerateRequest& request, absl::Time client_deadline,
                           std::shared_ptr<GenerateSink> sink, std::function<void(absl::Status)> done);

  // The client went away: cancel the worker call now (the worker frees the
  // sequence's KV blocks). No-op for unknown ids.
  void Cancel(const std::string& request_id);

  // Serves one request, blocking the calling thread until it has its outcome
  // (CANCELLED when the client went away); the sink is written from this
  // thread. For the gRPC Frontend; the HTTP front door uses GenerateAsync.
  absl::Status Generate(const v1::GenerateRequest& request, absl::Time client_deadline,
                        GenerateSink* sink);

  // Periodic work, from the coordinator's control loop: expires heartbeats
  // unless `expire_heartbeats` is false (a silent rank is probed with a Status
  // call and kept when it answers, else marked dead and its requests failed),
  // cancels worker calls whose client has gone away and resumes waiting
  // requests once a group serves.
  void Poll(bool expire_heartbeats = true);

  // Sends `plan` to `rank` and returns at once. Requests not in flight there
  // (finished, parked, resumed elsewhere) are left out; the worker sees its
  // own ids for the rest. Plans to a rank are numbered so that the worker
  // ignores one overtaken by a newer (time-based numbers, so a restarted
  // coordinator's plans count as newer). `done` (may be null) runs once, on
  // the client's threads or before SendStepPlan returns, with how many of
  // `preempt` the worker preempted, or the error; errors are also logged, at
  // most once a minute per rank. Must not block.
  void SendStepPlan(int rank, const RankStepPlan& plan,
                    std::function<void(absl::StatusOr<int>)> done = nullptr);

  // Ends every attempt in flight on `rank` with UNAVAILABLE "rank R died:
  // REASON"; those requests resume elsewhere when resumes are on.
  void FailRank(int rank, const std::string& reason);

  // Fails everything in flight and refuses new requests (UNAVAILABLE).
  void Shutdown();

  int InFlight(int rank) const;
  RouterStats stats() const;

  // Waits for every request's `done` (and any Status probe, heartbeat probes
  // included) to have run.
  ~Router();

 private:
  struct Call;
  class Relay;

  // Starts a request; null when it already has its outcome (sent to `done`).
  std::shared_ptr<Call> Start(const v1::GenerateRequest& request, absl::Time client_deadline,
                              std::shared_ptr<GenerateSink> sink,
                              std::function<void(absl::Status)> done, bool cancel_is_ok,
                              std::optional<int> forced_rank = std::nullopt);
  // Starts the call's next attempt on `rank` (a parked call claimed by the caller).
  void Launch(const std::shared_ptr<Call>& call, int rank);
  void OnWorkerResponse(const std::shared_ptr<Call>& call, const v1::GenerateResponse& response);
  void OnWorkerDone(const std::shared_ptr<Call>& call, const absl::Status& worker_status);
  // An attempt ended with `outcome`: resume the request or give it its outcome.
  void AfterAttempt(const std::shared_ptr<Call>& call, absl::Status outcome);
  // Parks the call for a later attempt when it may resume; else false and
  // `outcome` says why not (when the limit was reached).
  bool Park(const std::shared_ptr<Call>& call, absl::Status* outcome);
  // Starts a parked call on a serving rank, or ends it when it waited too long
  // or its client left; no-op when the group does not serve yet.
  void TryResume(const std::shared_ptr<Call>& call);
  // True for the one caller that takes a parked call out of the parking.
  bool Claim(const std::shared_ptr<Call>& call);
  // The tokens relayed already end the request (a stop token, or max_tokens):
  // the rank died before its final message.
  std::optional<v1::FinishReason> FinishedByTokens(const Call& call) const;
  // Removes the call and gives it its outcome.
  void Finish(const std::shared_ptr<Call>& call, absl::Status outcome);
  void Complete(const std::shared_ptr<Call>& call, absl::Status outcome);
  // Marks the call cancelled by its client and cancels the worker call.
  void CancelByClient(const std::shared_ptr<Call>& call);
  // The outcome when no Status probe is needed; nullopt when it is.
  std::optional<absl::Status> Outcome(const Call& call, const absl::Status& worker_status) const;
  absl::Status ProbedOutcome(const Call& call, const absl::Status& worker_status,
                             const absl::StatusOr<v1::WorkerStatusReply>& probe);
  // Probes the membership's new suspects and fails the ranks it marked dead.
  void ExpireHeartbeats();
  // Asks a suspect's worker for its status: an answer keeps the rank.
  void ProbeSuspect(const SuspectRank& suspect);
  void OnSuspectProbed(const SuspectRank& suspect, const absl::Status& probe);
  std::string DeadRanksSummary() const;
  // Why no rank can take a request now (PickRank's errors); the candidate
  // ranks otherwise.
  absl::StatusOr<std::vector<int>> ServingRanks(const std::vector<RankInfo>& ranks) const;
  bool Reforming() const;
  void Released();

  Membership* const membership_;
  WorkerClientFactory* const clients_;
  const RouterOptions options_;

  mutable absl::Mutex mu_;
  // Until they have their outcome (parked ones too), by sequence number and by request id.
  std::map<uint64_t, std::shared_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> by_id_ ABSL_GUARDED_BY(mu_);
  std::vector<int> in_flight_ ABSL_GUARDED_BY(mu_);  // per rank
  uint64_t next_call_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  // Requests whose `done` has not run yet (a Status probe may outlive calls_),
  // step plans not answered yet and heartbeat probes in flight.
  int outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int, uint64_t> plan_sequence_ ABSL_GUARDED_BY(mu_);        // the last sent, per rank
  std::map<int, absl::Time> plan_error_logged_ ABSL_GUARDED_BY(mu_);  // per rank
  RouterStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::cluster
