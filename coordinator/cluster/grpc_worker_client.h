// WorkerClient over gRPC: one channel per worker endpoint, keepalive on,
// every call with a deadline.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "common/grpc_security.h"
#include "coordinator/cluster/worker_client.h"

namespace joule::cluster {

class GrpcWorkerClientFactory final : public WorkerClientFactory {
 public:
  // Channels use `security`'s TLS material and cluster token (none: insecure).
  explicit GrpcWorkerClientFactory(GrpcSecurity security = {}) : security_(std::move(security)) {}
  std::shared_ptr<WorkerClient> Connect(const std::string& endpoint) override;

 private:
  const GrpcSecurity security_;
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<WorkerClient>> clients_ ABSL_GUARDED_BY(mu_);
};

std::shared_ptr<WorkerClient> MakeGrpcWorkerClient(const std::string& endpoint,
                                                   const GrpcSecurity& security = {});

}  // namespace joule::cluster
