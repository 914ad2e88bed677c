// WorkerClient over gRPC: one channel per worker endpoint, keepalive on,
// every call with a deadline.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "coordinator/cluster/worker_client.h"

namespace joule::cluster {

class GrpcWorkerClientFactory final : public WorkerClientFactory {
 public:
  std::shared_ptr<WorkerClient> Connect(const std::string& endpoint) override;

 private:
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<WorkerClient>> clients_ ABSL_GUARDED_BY(mu_);
};

std::shared_ptr<WorkerClient> MakeGrpcWorkerClient(const std::string& endpoint);

}  // namespace joule::cluster
