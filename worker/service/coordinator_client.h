// The worker's side of the Coordinator service (cluster.proto), as a plain
// interface: the heartbeat loop and start-up depend on this, the gRPC client
// (grpc_coordinator_client.h) implements it, tests use
// FakeCoordinatorClient (fake_coordinator_client.h).
#pragma once

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/joule/v1/cluster.pb.h"

namespace joule::worker {

class CoordinatorClient {
 public:
  virtual ~CoordinatorClient() = default;
  virtual absl::StatusOr<v1::RegisterReply> Register(const v1::RegisterRequest& request) = 0;
  // Blocks until every rank has registered; `timeout` bounds the wait.
  virtual absl::StatusOr<v1::RendezvousReply> Rendezvous(const v1::RendezvousRequest& request,
                                                         absl::Duration timeout) = 0;
  virtual absl::StatusOr<v1::HeartbeatReply> Heartbeat(const v1::HeartbeatRequest& request) = 0;
};

}  // namespace joule::worker
