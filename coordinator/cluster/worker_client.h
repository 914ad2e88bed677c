// The coordinator's view of one worker's Worker service (generate.proto),
// without gRPC types: grpc_worker_client.h implements it over a channel with
// gRPC's callback API, fake_worker_client.h in memory for tests.
//
// Calls are asynchronous so that no coordinator thread is held per request:
// thousands of streams share gRPC's few callback threads.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/joule/v1/generate.pb.h"

namespace joule::cluster {

// Receives one Worker.Generate call's events on the client's threads (gRPC's,
// for the real client): OnResponse one at a time and in order (the next one
// comes only after the previous returned), then OnDone exactly once, after
// the last OnResponse. Must not block.
class GenerateObserver {
 public:
  virtual ~GenerateObserver() = default;
  virtual void OnResponse(const v1::GenerateResponse& response) = 0;
  // How the stream ended: OK, the worker's error, CANCELLED after Cancel(),
  // DEADLINE_EXCEEDED, UNAVAILABLE when the worker cannot be reached.
  virtual void OnDone(absl::Status status) = 0;
};

// One Worker.Generate call in flight.
class GenerateCall {
 public:
  virtual ~GenerateCall() = default;
  // Cancels the call, from any thread, any number of times (a no-op once it
  // ended): the worker drops the sequence and frees its KV blocks; OnDone
  // still runs. Must not be called with a lock that the observer takes.
  virtual void Cancel() = 0;
};

using StatusCallback = std::function<void(absl::StatusOr<v1::WorkerStatusReply>)>;
using StepPlanCallback = std::function<void(absl::StatusOr<v1::StepPlanReply>)>;

class WorkerClient {
 public:
  virtual ~WorkerClient() = default;
  // Starts a call and returns at once; never null. The client keeps `observer`
  // alive until OnDone has run. Errors (worker unreachable, ...) arrive
  // through OnDone, which may run before Generate returns.
  virtual std::shared_ptr<GenerateCall> Generate(const v1::GenerateRequest& request,
                                                 absl::Time deadline,
                                                 std::shared_ptr<GenerateObserver> observer) = 0;
  // Asks the worker for its status; `done` runs exactly once, on the client's
  // threads (possibly before Status returns), and must not block.
  virtual void Status(absl::Time deadline, StatusCallback done) = 0;
  // Sends the worker the scheduler's plan for its next steps (SetStepPlan);
  // `done` runs exactly once, like Status's. The worker answers once a step
  // has applied the plan.
  virtual void SetStepPlan(const v1::StepPlanRequest& plan, absl::Time deadline,
                           StepPlanCallback done) = 0;
};

// Hands out one client per worker endpoint ("host:port"), reused across calls.
class WorkerClientFactory {
 public:
  virtual ~WorkerClientFactory() = default;
  virtual std::shared_ptr<WorkerClient> Connect(const std::string& endpoint) = 0;
};

}  // namespace joule::cluster
