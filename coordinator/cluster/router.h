// Request routing for data-parallel attention: validates a token-id request,
// picks the least loaded ready rank, relays that worker's Generate stream to
// the client and gives every request exactly one outcome (finished, cancelled
// or a clear error). Client cancellation cancels the worker call, so the
// worker frees the sequence's KV blocks; a rank that dies fails its requests
// with the reason.
//
// Plain C++: the gRPC adapter (coordinator_service.h) supplies a GenerateSink.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

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

  // Serves one request, blocking until it has its outcome.
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

 private:
  struct Call {
    std::string request_id;
    int rank = 0;
    GenerateSink* sink = nullptr;
    GenerateStream* stream = nullptr;
    absl::Status abort;             // set once: why the coordinator ended it
    bool client_cancelled = false;  // the client went away
  };

  void AbortLocked(Call* call, absl::Status why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Outcome(const Call& call, const absl::Status& worker_status,
                       WorkerClient* client, bool finished);
  std::string DeadRanksSummary() const;

  Membership* const membership_;
  WorkerClientFactory* const clients_;
  const RouterOptions options_;

  mutable absl::Mutex mu_;
  std::map<uint64_t, Call*> calls_ ABSL_GUARDED_BY(mu_);  // in flight, by sequence number
  uint64_t next_call_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace joule::cluster
