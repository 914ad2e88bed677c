// The coordinator's view of one worker's Worker service (generate.proto),
// without gRPC types: grpc_worker_client.h implements it over a channel,
// fake_worker_client.h in memory for tests.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/joule/v1/generate.pb.h"

namespace joule::cluster {

// One server-streaming Worker.Generate call.
class GenerateStream {
 public:
  virtual ~GenerateStream() = default;
  // Blocks for the next message; false once the stream has ended (then call Finish).
  virtual bool Read(v1::GenerateResponse* response) = 0;
  // Cancels the call, from any thread: the worker drops the sequence and frees
  // its KV blocks; a blocked Read returns false.
  virtual void Cancel() = 0;
  // How the stream ended; call once, after Read returned false.
  virtual absl::Status Finish() = 0;
};

class WorkerClient {
 public:
  virtual ~WorkerClient() = default;
  // Never null; errors (worker unreachable, ...) surface through Finish().
  virtual std::unique_ptr<GenerateStream> Generate(const v1::GenerateRequest& request,
                                                   absl::Time deadline) = 0;
  virtual absl::StatusOr<v1::WorkerStatusReply> Status(absl::Time deadline) = 0;
};

// Hands out one client per worker endpoint ("host:port"), reused across calls.
class WorkerClientFactory {
 public:
  virtual ~WorkerClientFactory() = default;
  virtual std::shared_ptr<WorkerClient> Connect(const std::string& endpoint) = 0;
};

}  // namespace joule::cluster
