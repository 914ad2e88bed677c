// Request routing for data-parallel attention: validates a token-id request,
// picks the least loaded ready rank, relays that worker's Generate stream to
// the client and gives every request exactly one outcome (finished, cancelled
// or a clear error). Client cancellation cancels the worker call, so the
// worker frees the sequence's KV blocks; a rank that dies fails its requests
// with the reason.
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
  // (expert-parallel ranks serve only together).
  absl::StatusOr<int> PickRank() const;

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
  // (failing the dead ranks' requests) and cancels worker calls whose client
  // has gone away.
  void Poll();

  // Fails every request in flight on `rank` with UNAVAILABLE "rank R died: REASON".
  void FailRank(int rank, const std::string& reason);

  // Fails everything in flight and refuses new requests (UNAVAILABLE).
  void Shutdown();

  int InFlight(int rank) const;

  // Waits for every request's `done` (and any Status probe) to have run.
  ~Router();

 private:
  struct Call;
  class Relay;

  // Starts a request; null when it already has its outcome (sent to `done`).
  std::shared_ptr<Call> Start(const v1::GenerateRequest& request, absl::Time client_deadline,
                              std::shared_ptr<GenerateSink> sink,
                              std::function<void(absl::Status)> done, bool cancel_is_ok,
                              std::optional<int> forced_rank = std::nullopt);
  void OnWorkerResponse(const std::shared_ptr<Call>& call, const v1::GenerateResponse& response);
  void OnWorkerDone(const std::shared_ptr<Call>& call, const absl::Status& worker_status);
  void Complete(const std::shared_ptr<Call>& call, absl::Status outcome);
  // Marks the call cancelled by its client and cancels the worker call.
  void CancelByClient(const std::shared_ptr<Call>& call);
  // The outcome when no Status probe is needed; nullopt when it is.
  std::optional<absl::Status> Outcome(const Call& call, const absl::Status& worker_status) const;
  absl::Status ProbedOutcome(const Call& call, const absl::Status& worker_status,
                             const absl::StatusOr<v1::WorkerStatusReply>& probe);
  std::string DeadRanksSummary() const;
  void Released();

  Membership* const membership_;
  WorkerClientFactory* const clients_;
  const RouterOptions options_;

  mutable absl::Mutex mu_;
  // In flight (until the worker call ended), by sequence number and by request id.
  std::map<uint64_t, std::shared_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> by_id_ ABSL_GUARDED_BY(mu_);
  std::vector<int> in_flight_ ABSL_GUARDED_BY(mu_);  // per rank
  uint64_t next_call_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  // Requests whose `done` has not run yet (a Status probe may outlive calls_).
  int outstanding_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace joule::cluster
