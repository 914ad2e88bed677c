// joule-coordinator assembled: reads the model, builds membership, routing and
// the gRPC server (Coordinator + Frontend services), and runs the control loop
// (heartbeat expiry, client cancellations, periodic rebalancing) on one owned
// thread that Stop() joins.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "coordinator/cluster/clock.h"
#include "coordinator/cluster/coordinator_options.h"
#include "coordinator/cluster/coordinator_service.h"
#include "coordinator/cluster/membership.h"
#include "coordinator/cluster/router.h"
#include "coordinator/cluster/worker_client.h"

namespace joule::cluster {

class CoordinatorServer {
 public:
  // Binds and starts serving. `clients` defaults to gRPC worker clients.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(
      const CoordinatorOptions& options, std::unique_ptr<WorkerClientFactory> clients = nullptr);
  ~CoordinatorServer();  // Stop()s

  int port() const { return port_; }
  const std::string& model_fingerprint() const { return fingerprint_; }
  Membership* membership() { return membership_.get(); }
  Router* router() { return router_.get(); }

  // Fails requests in flight, ends long polls, stops the server (waiting a
  // short grace period for calls to finish) and joins the control loop. Idempotent.
  void Stop();

 private:
  CoordinatorServer() = default;
  void ControlLoop();

  CoordinatorOptions options_;
  std::string fingerprint_;
  RealClock clock_;
  std::unique_ptr<Membership> membership_;
  std::unique_ptr<WorkerClientFactory> clients_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<CoordinatorServiceImpl> coordinator_service_;
  std::unique_ptr<FrontendServiceImpl> frontend_service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  absl::Notification stop_;
  std::thread control_loop_;
  bool stopped_ = false;
};

}  // namespace joule::cluster
