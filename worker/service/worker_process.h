// One joule-worker process from start to exit, over a CoordinatorClient:
//   1. start the Worker gRPC server (port 0: ephemeral, reported);
//   2. Register (protocol version, model fingerprint and info, rank request,
//      worker_id host:pid:nonce, endpoint) -> rank, world size, placement;
//   3. load the model with only this rank's experts (mmap: the rest never
//      becomes resident);
//   4. open the transport for (rank, world), Rendezvous (sending its address)
//      -> every peer's address, Connect (bounded by the step timeout); with
//      --transport nccl the address is a descriptor (nccl_group.h), rank 0's
//      carrying the NCCL unique id, and the transport a StagedTransport over
//      the NCCL communicator (RowTransport());
//   5. build the expert-parallel executor, engine and runtime, start the step
//      loop and the heartbeat (which reports ready).
// Wait() returns once the worker has stopped: asked to (SIGTERM, coordinator),
// its step loop failed (peer lost), or the coordinator became unreachable.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "grpcpp/grpcpp.h"
#include "common/grpc_keep_awake.h"
#include "common/grpc_security.h"
#include "worker/ep/transport.h"
#include "worker/model/model.h"
#include "worker/service/coordinator_client.h"
#include "worker/service/heartbeat.h"
#include "worker/service/placement_loader.h"
#include "worker/service/starting_handler.h"
#include "worker/service/worker_config.h"
#include "worker/service/worker_grpc_service.h"
#include "worker/service/worker_metrics.h"
#include "worker/service/worker_runtime.h"

namespace joule::worker {

class WorkerProcess {
 public:
  // `coordinator` is not owned. The Worker gRPC server uses `security`'s TLS
  // material and requires its cluster token (none: insecure, open).
  WorkerProcess(WorkerConfig config, CoordinatorClient* coordinator, GrpcSecurity security = {});
  ~WorkerProcess();

  // Steps 1-5; an error names the step that failed. Stop() makes a pending
  // rendezvous give up.
  absl::Status Start();
  // Port of the Worker gRPC server (after Start began).
  int port() const { return port_; }
  // Port of the /metrics server; 0 when it is off (--metrics-port -1).
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }
  int rank() const { return rank_; }

  // Thread-safe; the first call wins. Stop: a requested stop (Wait returns
  // OK); Fail: the worker cannot go on (Wait returns `error`).
  void Stop(const std::string& reason);
  void Fail(const absl::Status& error);
  // Blocks until the worker stops, shuts it down in order (step loop, streams,
  // server, heartbeat) and returns OK for a requested stop, the error otherwise.
  absl::Status Wait();

 private:
  absl::Status StartServer();
  absl::Status StartMetrics();
  absl::Status Register(int requested_rank);
  absl::Status LoadModel();
  absl::Status ConnectPeers();
  // A joiner (RegisterReply.joining): asks the coordinator to take it into the
  // running group, connects to that group and loads the experts it gets.
  absl::Status JoinRunningGroup();
  // A transport to the group of `group_epoch` (0: the first), as
  // `transport_rank` of `world`, connected to every peer after the rendezvous.
  absl::StatusOr<std::unique_ptr<ep::Transport>> JoinGroup(int transport_rank, int world,
                                                          uint64_t group_epoch);
  // JoinGroup for --transport ucx, and for --transport nccl (a StagedTransport
  // over the NCCL communicator: host collectives work unchanged).
  absl::StatusOr<std::unique_ptr<ep::Transport>> JoinUcxGroup(int transport_rank, int world,
                                                             uint64_t group_epoch);
  absl::StatusOr<std::unique_ptr<ep::Transport>> JoinNcclGroup(int transport_rank, int world,
                                                              uint64_t group_epoch);
  // The rendezvous of group `group_epoch` (0: the first): sends `address` as
  // this rank's transport address and returns every rank's, by transport rank,
  // once each is known (retrying until --rendezvous-timeout-ms; Stop() ends it).
  absl::StatusOr<std::vector<std::string>> RendezvousAddresses(const std::string& address,
                                                               int transport_rank, int world,
                                                               uint64_t group_epoch);
  // Device-memory transport for expert rows, null unless --transport nccl:
  // the NCCL communicator under `transport` (whose host collectives it
  // stages). Owned by `transport` and replaced with it.
  static ep::Transport* RowTransport(ep::Transport* transport);
  absl::Status StartServing();
  // The regroup thread: takes each new group the heartbeat brings (Regroup).
  void RegroupLoop();
  // Leaves the broken group and serves in `update`'s, keeping every request.
  absl::Status Regroup(const v1::GroupUpdate& update);
  // Leaves the current group (interrupting its step) and serves in the one of
  // `epoch` as `transport_rank` of `world`, met at `rendezvous_epoch`'s
  // rendezvous, with `placement` (loading the experts it adds).
  absl::Status SwitchGroup(int transport_rank, int world, uint64_t rendezvous_epoch,
                           uint64_t epoch, const v1::Placement& placement, const std::string& why);
  // The coordinator restarted (it does not know this worker): registers again
  // for the same rank and forms the new coordinator's first group, keeping the
  // loaded weights.
  absl::Status Reregister();
  void Shutdown();

  const WorkerConfig config_;
  CoordinatorClient* const coordinator_;
  const GrpcSecurity security_;
  std::string worker_id_;
  // RegisterReply.worker_secret of the last registration (Register's thread;
  // the heartbeat gets its own copy).
  std::string worker_secret_;
  std::string endpoint_;
  int port_ = 0;
  int rank_ = -1;
  int world_size_ = 0;
  uint64_t placement_epoch_ = 0;
  absl::Duration heartbeat_interval_ = absl::Seconds(1);
  absl::Duration step_timeout_;  // the coordinator's, else --step-timeout-ms
  bool elastic_ = false;           // the coordinator re-forms groups (RegisterReply.elastic)
  bool joining_ = false;           // registered into a running group (RegisterReply.joining)
  ModelConfig model_config_;
  Placement placement_;

  StartingHandler handler_;
  std::unique_ptr<WorkerGrpcService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<GrpcKeepAwake> keep_awake_;  // Generate's reactors never wait for a napping poller
  std::unique_ptr<WorkerMetricsServer> metrics_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ep::Transport> transport_;
  std::unique_ptr<PlacementLoader> loader_;
  std::unique_ptr<ModelWeights> joined_weights_;  // a joiner's experts, until the runtime has them
  std::unique_ptr<telemetry::EnergyMeter> energy_meter_;  // outlives runtime_
  std::unique_ptr<WorkerRuntime> runtime_;
  std::unique_ptr<HeartbeatLoop> heartbeat_;
  std::thread regroup_thread_;
  uint64_t group_epoch_ = 1;  // regroup thread only, after start-up

  absl::Notification stop_;
  mutable absl::Mutex mu_;
  std::string stop_reason_ ABSL_GUARDED_BY(mu_);
  absl::Status stop_status_ ABSL_GUARDED_BY(mu_);
  std::optional<v1::GroupUpdate> next_group_ ABSL_GUARDED_BY(mu_);  // newest from heartbeats
  // Its heartbeat was answered with shutdown, or went unanswered too long.
  bool stopped_by_coordinator_ ABSL_GUARDED_BY(mu_) = false;
  bool reregister_ ABSL_GUARDED_BY(mu_) = false;  // a heartbeat got NOT_FOUND
  absl::Time registered_at_ ABSL_GUARDED_BY(mu_);   // when the last Register answered
};

}  // namespace joule::worker
