// joule-coordinator assembled: reads the model, builds membership, routing,
// the gRPC server (Coordinator + Frontend services) and, with --http-port, the
// OpenAI-compatible HTTP API (coordinator/http), and runs the control loop
// (heartbeat expiry, client cancellations, periodic rebalancing) on one owned
// thread that Stop() joins.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "common/grpc_keep_awake.h"
#include "coordinator/cluster/clock.h"
#include "coordinator/cluster/coordinator_options.h"
#include "coordinator/cluster/coordinator_service.h"
#include "coordinator/cluster/membership.h"
#include "coordinator/cluster/router.h"
#include "coordinator/cluster/worker_client.h"
#include "coordinator/http/http_server.h"
#include "coordinator/http/openai_service.h"
#include "coordinator/http/router_backend.h"
#include "coordinator/http/scheduled_backend.h"
#include "scheduler/scheduler.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "prometheus/registry.h"

namespace joule::cluster {

class CoordinatorServer {
 public:
  // Binds and starts serving. `clients` defaults to gRPC worker clients.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(
      const CoordinatorOptions& options, std::unique_ptr<WorkerClientFactory> clients = nullptr);
  ~CoordinatorServer();  // Stop()s

  int port() const { return port_; }
  // The HTTP API's port; -1 when --http-port is -1.
  int http_port() const { return http_server_ ? http_server_->port() : -1; }
  const std::string& model_fingerprint() const { return fingerprint_; }
  Membership* membership() { return membership_.get(); }
  Router* router() { return router_.get(); }

  // Fails requests in flight, ends long polls, stops the server (waiting a
  // short grace period for calls to finish) and joins the control loop. Idempotent.
  void Stop();

 private:
  CoordinatorServer() = default;
  void ControlLoop();
  absl::Status StartHttp();

  CoordinatorOptions options_;
  std::string fingerprint_;
  RealClock clock_;
  // The HTTP front door is declared before the router so that it is destroyed
  // after it: ~Router waits for every request's `done`, which still reaches
  // the service and the connections.
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  std::shared_ptr<prometheus::Registry> metrics_registry_;
  // Without a scheduler (--policy none) the front door talks to the router directly.
  std::unique_ptr<scheduler::Scheduler> scheduler_;
  std::unique_ptr<http::ScheduledBackend> scheduled_backend_;
  std::unique_ptr<http::RouterBackend> http_backend_;
  std::unique_ptr<http::OpenAiService> openai_service_;
  std::unique_ptr<http::HttpServer> http_server_;
  std::unique_ptr<Membership> membership_;
  std::unique_ptr<WorkerClientFactory> clients_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<CoordinatorServiceImpl> coordinator_service_;
  std::unique_ptr<FrontendServiceImpl> frontend_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<GrpcKeepAwake> keep_awake_;  // the router's calls never wait for a napping poller
  int port_ = 0;
  absl::Notification stop_;
  std::thread control_loop_;
  bool stopped_ = false;
};

}  // namespace joule::cluster
