// CoordinatorClient over gRPC: every call carries a deadline, the channel
// keeps itself alive with keepalive pings.
#pragma once

#include <memory>
#include <string>

#include "absl/time/time.h"
#include "common/grpc_security.h"
#include "worker/service/coordinator_client.h"

namespace joule::worker {

// `target` is host:port; `rpc_timeout` is the deadline of Register and Heartbeat;
// `security` gives the channel's TLS material and cluster token (none: insecure).
std::unique_ptr<CoordinatorClient> MakeGrpcCoordinatorClient(const std::string& target,
                                                             absl::Duration rpc_timeout,
                                                             const GrpcSecurity& security = {});

}  // namespace joule::worker
