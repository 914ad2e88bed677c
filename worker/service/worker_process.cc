#include "worker/service/worker_process.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <random>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/host_port.h"
#include "common/logging.h"
#include "common/model_fingerprint.h"
#include "common/status.h"
#include "kernels/cpu/thread_pool.h"
#include "worker/device/backend.h"
#include "worker/device/device_spec.h"
#include "worker/engine/engine.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/staged_transport.h"
#include "worker/ep/ucx_transport.h"
#include "worker/service/convert.h"
#include "worker/service/nccl_group.h"

namespace joule::worker {
namespace {

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

// 127.0.0.0/8, ::1 and "localhost": reachable from this host only.
bool IsLoopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || absl::StartsWith(host, "127.");
}

std::string MakeWorkerId() {
  std::random_device rd;
  const uint64_t nonce = (static_cast<uint64_t>(rd()) << 32) | rd();
  return absl::StrFormat("%s:%d:%016x", HostName(), getpid(), nonce);
}

// Splits "host:port" / "[v6]:port".
bool SplitHostPort(const std::string& target, std::string* host, std::string* port) {
  if (!target.empty() && target[0] == '[') {
    const size_t close = target.find(']');
    if (close == std::string::npos || close + 1 >= target.size() || target[close + 1] != ':') return false;
    *host = target.substr(1, close - 1);
    *port = target.substr(close + 2);
    return true;
  }
  const size_t colon = target.rfind(':');
  if (colon == std::string::npos) return false;
  *host = target.substr(0, colon);
  *port = target.substr(colon + 1);
  return true;
}

// The local address of the interface that routes to the coordinator: what a
// coordinator on another host (or network namespace) can reach us at.
std::string AddressFacing(const std::string& coordinator) {
  std::string host, port;
  if (!SplitHostPort(coordinator, &host, &port)) return HostName();
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) return HostName();
  std::string out = HostName();
  const int fd = socket(res->ai_family, SOCK_DGRAM, 0);
  if (fd >= 0) {
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    // A UDP connect sends nothing; it only picks the route and source address.
    if (connect(fd, res->ai_addr, res->ai_addrlen) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      char buf[INET6_ADDRSTRLEN] = {};
      if (local.ss_family == AF_INET) {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&local)->sin_addr, buf, sizeof(buf));
        out = buf;
      } else if (local.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr, buf, sizeof(buf));
        out = absl::StrCat("[", buf, "]");
      }
    }
    close(fd);
  }
  freeaddrinfo(res);
  return out;
}

}  // namespace

WorkerProcess::WorkerProcess(WorkerConfig config, CoordinatorClient* coordinator,
                             GrpcSecurity security)
    : config_(std::move(config)),
      coordinator_(coordinator),
      security_(std::move(security)),
      worker_id_(MakeWorkerId()),
      step_timeout_(absl::Milliseconds(config_.step_timeout_ms)) {}

WorkerProcess::~WorkerProcess() {
  Stop("worker process destroyed");
  Shutdown();
}

void WorkerProcess::Stop(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (stop_.HasBeenNotified()) return;
  stop_reason_ = reason;
  stop_.Notify();
}

void WorkerProcess::Fail(const absl::Status& error) {
  absl::MutexLock lock(&mu_);
  if (stop_.HasBeenNotified()) return;
  stop_reason_ = std::string(error.message());
  stop_status_ = error;
  stop_.Notify();
}

absl::Status WorkerProcess::Start() {
  JOULE_LOG(Info) << "joule-worker " << worker_id_ << " starting with\n" << config_.ToString();
  RETURN_IF_ERROR(Annotate(StartServer(), "starting the Worker gRPC server"));
  RETURN_IF_ERROR(Annotate(StartMetrics(), "starting the metrics server"));
  RETURN_IF_ERROR(Register(config_.rank));
  RETURN_IF_ERROR(Annotate(LoadModel(), absl::StrCat("loading model ", config_.model)));
  RETURN_IF_ERROR(Annotate(ConnectPeers(), "connecting to the other ranks"));
  RETURN_IF_ERROR(StartServing());
  return absl::OkStatus();
}

absl::Status WorkerProcess::StartServer() {
  service_ = std::make_unique<WorkerGrpcService>(&handler_, security_.token);
  grpc::ServerBuilder builder;
  const std::string listen = HostPort(config_.GrpcHost(), config_.port);
  builder.AddListeningPort(listen, MakeServerCredentials(security_), &port_);
  builder.RegisterService(service_.get());
  // Let the coordinator's keepalive pings through, also between calls.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen));
  }
  keep_awake_ = std::make_unique<GrpcKeepAwake>(server_->InProcessChannel(grpc::ChannelArguments()));
  const std::string host =
      config_.advertise_host.empty() ? AddressFacing(config_.coordinator) : config_.advertise_host;
  endpoint_ = HostPort(host, port_);
  if (IsLoopback(config_.GrpcHost()) && !IsLoopback(host)) {
    // The coordinator would be told an address where nothing listens.
    return absl::FailedPreconditionError(absl::StrCat(
        "--grpc-host ", config_.GrpcHost(), " listens on this host only, but the coordinator reaches this worker at ",
        host, ": set --grpc-host 0.0.0.0 or ", host));
  }
  JOULE_LOG(Info) << "Worker gRPC server listening on " << HostPort(config_.GrpcHost(), port_)
                  << " (advertised as " << endpoint_ << ")";
  return absl::OkStatus();
}

absl::Status WorkerProcess::StartMetrics() {
  if (config_.metrics_port < 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(metrics_,
                   WorkerMetricsServer::Start(config_.metrics_host, config_.metrics_port, &handler_));
  JOULE_LOG(Info) << "metrics on http://" << HostPort(config_.metrics_host, metrics_->port()) << "/metrics";
  if (!config_.metrics_port_file.empty()) {
    // Written to a temporary name and renamed: a script polling for the file
    // never reads a partial port.
    const std::string tmp = config_.metrics_port_file + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << metrics_->port() << "\n";
      if (!out) return absl::InternalError(absl::StrCat("--metrics-port-file: cannot write ", tmp));
    }
    if (std::rename(tmp.c_str(), config_.metrics_port_file.c_str()) != 0) {
      return absl::InternalError(
          absl::StrCat("--metrics-port-file: cannot rename ", tmp, " to ", config_.metrics_port_file));
    }
  }
  return absl::OkStatus();
}

absl::Status WorkerProcess::Register(int requested_rank) {
  ASSIGN_OR_RETURN(model_config_, LoadModelConfig(config_.model));
  absl::StatusOr<std::string> fingerprint = ModelFingerprint(config_.model);
  if (!fingerprint.ok()) return Annotate(fingerprint.status(), "model fingerprint");

  v1::RegisterRequest request;
  request.set_protocol_version(v1::PROTOCOL_VERSION_1);
  request.set_model_fingerprint(*fingerprint);
  std::string name = config_.model;
  while (name.size() > 1 && name.back() == '/') name.pop_back();
  if (size_t slash = name.rfind('/'); slash != std::string::npos) name = name.substr(slash + 1);
  *request.mutable_model() = ToModelInfo(model_config_, name);
  request.set_requested_rank(requested_rank);
  request.set_worker_id(worker_id_);
  request.set_host(HostName());
  request.set_device(config_.device);
  request.set_memory_bytes(static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE));
  request.set_transport(config_.transport == "nccl" ? v1::TRANSPORT_KIND_NCCL : v1::TRANSPORT_KIND_UCX);
  // The transport address goes with the rendezvous: UCX needs our rank first.
  request.set_worker_endpoint(endpoint_);
  request.set_max_running(config_.max_running);
  request.set_max_batch_tokens(config_.max_batch_tokens);

  // The coordinator may start after the workers: retry while it is
  // unreachable (a registration whose reply was lost gets the same rank back:
  // same worker_id). Refusals (wrong model, duplicate rank, ...) are final.
  const absl::Time deadline = absl::Now() + absl::Milliseconds(config_.rendezvous_timeout_ms);
  absl::StatusOr<v1::RegisterReply> reply;
  while (true) {
    reply = coordinator_->Register(request);
    const bool transient = !reply.ok() && (reply.status().code() == absl::StatusCode::kUnavailable ||
                                           reply.status().code() == absl::StatusCode::kDeadlineExceeded);
    if (!transient || absl::Now() >= deadline || stop_.HasBeenNotified()) break;
    JOULE_LOG(Warning) << reply.status().message() << "; retrying";
    absl::SleepFor(absl::Seconds(1));
  }
  if (!reply.ok()) return reply.status();  // already names the call and the coordinator
  {
    absl::MutexLock lock(&mu_);
    registered_at_ = absl::Now();
  }
  rank_ = reply->rank();
  world_size_ = reply->world_size();
  worker_secret_ = reply->worker_secret();
  if (heartbeat_) heartbeat_->SetWorkerSecret(worker_secret_);
  placement_epoch_ = reply->placement().epoch();
  if (reply->heartbeat_interval_ms() > 0) {
    heartbeat_interval_ = absl::Milliseconds(reply->heartbeat_interval_ms());
  }
  elastic_ = reply->elastic();
  step_timeout_ = absl::Milliseconds(config_.step_timeout_ms);
  if (reply->step_timeout_ms() > 0) {
    // Every rank must give up on a lost peer alike: the cluster's value wins.
    step_timeout_ = absl::Milliseconds(reply->step_timeout_ms());
    if (reply->step_timeout_ms() != config_.step_timeout_ms) {
      JOULE_LOG(Info) << "step timeout " << absl::FormatDuration(step_timeout_)
                      << " from the coordinator (overrides --step-timeout-ms="
                      << config_.step_timeout_ms << ")";
    }
  }
  if (world_size_ < 1 || rank_ < 0 || rank_ >= world_size_) {
    return absl::InvalidArgumentError(absl::StrCat("coordinator assigned rank ", rank_,
                                                   " of world size ", world_size_));
  }
  joining_ = reply->joining();
  if (joining_) {
    // Its experts come with the group it joins (JoinRunningGroup).
    JOULE_LOG(Info) << "registered as rank " << rank_ << " (worker " << worker_id_
                    << "): joins the running expert-parallel group once loaded";
    return absl::OkStatus();
  }
  absl::StatusOr<Placement> placement = PlacementFromProto(reply->placement(), model_config_);
  if (!placement.ok()) return Annotate(placement.status(), "placement from the coordinator");
  if (placement->num_ranks != world_size_) {
    return absl::InvalidArgumentError(absl::StrCat("placement.num_ranks ", placement->num_ranks,
                                                   " != world size ", world_size_));
  }
  placement_ = *std::move(placement);
  int experts = 0;
  for (int l = 0; l < model_config_.num_layers; ++l) {
    experts += static_cast<int>(placement_.LocalExperts(rank_, l).size());
  }
  JOULE_LOG(Info) << "registered as rank " << rank_ << " of " << world_size_ << " (worker "
                  << worker_id_ << "); placement epoch " << placement_epoch_ << " gives this rank "
                  << experts << " expert(s) over all layers";
  return absl::OkStatus();
}

absl::Status WorkerProcess::LoadModel() {
  Model::Options options;
  ASSIGN_OR_RETURN(options.device, device::ParseDeviceSpec(config_.device));
  // Expert parallelism synchronizes with the host every MoE layer (the
  // layout and the count exchange): decode steps cannot be one graph then.
  options.cuda_graphs = config_.cuda_graphs && world_size_ == 1;
  const int usable = kernels::cpu::UsableCores();
  options.num_threads = config_.ComputeThreads(usable);
  JOULE_LOG(Info) << "compute threads: " << options.num_threads << " (usable cores " << usable
                  << ", --threads " << config_.threads << ", --workers-per-host "
                  << config_.workers_per_host << ")";
  const Placement placement = placement_;
  const int rank = rank_;
  const bool joining = joining_;
  options.weights.owns_expert = [placement, rank, joining](int layer, int expert) {
    return !joining && placement.Holds(rank, layer, expert);
  };
  ASSIGN_OR_RETURN(model_, Model::Load(config_.model, options));
  JOULE_LOG(Info) << "rank " << rank_ << ": loaded "
                  << absl::StrFormat("%.2f", model_->weights().LoadedBytes() / double(1 << 20))
                  << " MiB of weights (attention/dense + own experts) on "
                  << model_->backend().Describe();
  return absl::OkStatus();
}

absl::Status WorkerProcess::ConnectPeers() {
  if (joining_) return JoinRunningGroup();
  ASSIGN_OR_RETURN(transport_, JoinGroup(rank_, world_size_, /*group_epoch=*/0));
  return absl::OkStatus();
}

absl::Status WorkerProcess::JoinRunningGroup() {
  // Ask to join until the coordinator answers with the group that takes us in.
  v1::HeartbeatRequest request;
  request.set_worker_id(worker_id_);
  request.set_worker_secret(worker_secret_);
  request.set_rank(rank_);
  request.set_join(true);
  std::optional<v1::GroupUpdate> update;
  const absl::Time deadline = absl::Now() + absl::Milliseconds(config_.rendezvous_timeout_ms);
  while (!update.has_value()) {
    absl::StatusOr<v1::HeartbeatReply> reply = coordinator_->Heartbeat(request);
    if (reply.ok() && reply->shutdown()) {
      return absl::FailedPreconditionError(absl::StrCat("joining the group: ",
                                                        reply->shutdown_reason()));
    }
    if (reply.ok() && reply->has_group()) {
      update = reply->group();
      break;
    }
    if (absl::Now() >= deadline || stop_.HasBeenNotified()) {
      return absl::DeadlineExceededError(absl::StrCat(
          "joining the running group: no group update from the coordinator",
          reply.ok() ? "" : absl::StrCat(" (", reply.status().message(), ")")));
    }
    absl::SleepFor(heartbeat_interval_);
  }
  JOULE_LOG(Warning) << "rank " << rank_ << ": joining expert-parallel group epoch "
                     << update->epoch() << " as rank " << update->rank() << " of "
                     << update->world_size();
  ASSIGN_OR_RETURN(transport_, JoinGroup(update->rank(), update->world_size(), update->epoch()));
  // Holds nothing yet: Prepare loads the experts the group's placement gives it.
  Placement none;
  loader_ = std::make_unique<PlacementLoader>(config_.model, model_config_, update->rank(),
                                              update->world_size(), none);
  ASSIGN_OR_RETURN(PreparedPlacement prepared, loader_->Prepare(update->placement()));
  placement_ = prepared.placement;
  placement_epoch_ = prepared.epoch;
  joined_weights_ = std::move(prepared.weights);
  group_epoch_ = update->epoch();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ep::Transport>> WorkerProcess::JoinGroup(int transport_rank,
                                                                        int world,
                                                                        uint64_t group_epoch) {
  std::unique_ptr<ep::Transport> transport;
  if (config_.transport == "nccl") {
    ASSIGN_OR_RETURN(transport, JoinNcclGroup(transport_rank, world, group_epoch));
  } else {
    ASSIGN_OR_RETURN(transport, JoinUcxGroup(transport_rank, world, group_epoch));
  }
  JOULE_LOG(Info) << "rank " << rank_ << ": " << transport->name() << " transport connected to "
                  << world - 1 << " peer(s) as rank " << transport_rank << " of " << world
                  << (group_epoch > 0 ? absl::StrCat(" (group epoch ", group_epoch, ")") : "");
  return transport;
}

absl::StatusOr<std::unique_ptr<ep::Transport>> WorkerProcess::JoinUcxGroup(int transport_rank,
                                                                           int world,
                                                                           uint64_t group_epoch) {
  ASSIGN_OR_RETURN(std::unique_ptr<ep::UcxTransport> ucx,
                   ep::UcxTransport::Create(
                       transport_rank, world, {.timeout = step_timeout_},
                       {.spin_before_naps = absl::Microseconds(config_.ucx_spin_us)}));
  ASSIGN_OR_RETURN(std::vector<std::string> addresses,
                   RendezvousAddresses(ucx->address(), transport_rank, world, group_epoch));
  RETURN_IF_ERROR(ucx->Connect(addresses));
  return std::unique_ptr<ep::Transport>(std::move(ucx));
}

// Every rank sends a descriptor (nccl_group.h), rank 0's with a fresh NCCL
// unique id; every rank checks all of them alike, so a group NCCL cannot form
// is refused on every rank with the same message, before NCCL is asked.
absl::StatusOr<std::unique_ptr<ep::Transport>> WorkerProcess::JoinNcclGroup(int transport_rank,
                                                                            int world,
                                                                            uint64_t group_epoch) {
  RETURN_IF_ERROR(NcclTransportAvailable());  // a CPU build says so
  // A new group (a death, a join, a restarted coordinator) gets a new
  // communicator the same way: the group epoch's rendezvous carries its rank
  // 0's fresh unique id; the old communicator was aborted by Interrupt.
  device::Backend& backend = model_->backend();
  NcclRankDescriptor mine{.host = HostName(),
                          .device = backend.spec().ToString(),
                          .pci_bus_id = backend.pci_bus_id()};
  // A CPU rank makes no id: the group is refused below on every rank anyway.
  if (transport_rank == 0 && backend.spec().is_cuda()) {
    ASSIGN_OR_RETURN(mine.unique_id, MakeNcclUniqueId());
  }
  const std::string address = EncodeNcclDescriptor(mine);
  ASSIGN_OR_RETURN(std::vector<std::string> addresses,
                   RendezvousAddresses(address, transport_rank, world, group_epoch));
  addresses[transport_rank] = address;
  ASSIGN_OR_RETURN(const std::string unique_id, CheckNcclGroup(addresses));
  ASSIGN_OR_RETURN(std::unique_ptr<ep::Transport> nccl,
                   CreateNcclTransport(transport_rank, world, unique_id,
                                       {.timeout = step_timeout_}, backend.spec().index));
  return std::unique_ptr<ep::Transport>(
      std::make_unique<ep::StagedTransport>(std::move(nccl), &backend));
}

ep::Transport* WorkerProcess::RowTransport(ep::Transport* transport) {
  auto* staged = dynamic_cast<ep::StagedTransport*>(transport);
  return staged != nullptr ? staged->device_transport() : nullptr;
}

absl::StatusOr<std::vector<std::string>> WorkerProcess::RendezvousAddresses(
    const std::string& address, int transport_rank, int world, uint64_t group_epoch) {
  v1::RendezvousRequest request;
  request.set_worker_id(worker_id_);
  request.set_worker_secret(worker_secret_);
  request.set_rank(rank_);
  request.set_group_epoch(group_epoch);
  request.set_transport_address(address);

  // Rendezvous blocks until every rank registered; retry in slices so a stop
  // request is noticed, and until every peer's address is known (a peer may
  // have registered but not yet sent its address).
  const absl::Time deadline = absl::Now() + absl::Milliseconds(config_.rendezvous_timeout_ms);
  std::vector<std::string> addresses;
  while (true) {
    if (stop_.HasBeenNotified()) return absl::CancelledError("stopped while waiting for the rendezvous");
    const absl::Duration slice = std::min(absl::Seconds(10), deadline - absl::Now());
    absl::StatusOr<v1::RendezvousReply> reply = coordinator_->Rendezvous(request, slice);
    std::string waiting_for;
    if (reply.ok()) {
      addresses.assign(world, "");
      for (const v1::PeerInfo& peer : reply->peers()) {
        if (peer.rank() < 0 || peer.rank() >= world) {
          return absl::InvalidArgumentError(absl::StrCat("rendezvous: peer rank ", peer.rank(),
                                                         " out of range [0, ", world, ")"));
        }
        addresses[peer.rank()] = peer.transport_address();
      }
      for (int r = 0; r < world; ++r) {
        if (r != transport_rank && addresses[r].empty()) {
          absl::StrAppend(&waiting_for, waiting_for.empty() ? "" : ", ", r);
        }
      }
      if (waiting_for.empty()) return addresses;
      waiting_for = absl::StrCat("no transport address yet for rank(s) ", waiting_for);
      absl::SleepFor(absl::Milliseconds(100));
    } else {
      const bool retry = reply.status().code() == absl::StatusCode::kDeadlineExceeded ||
                         reply.status().code() == absl::StatusCode::kUnavailable;
      if (!retry) return reply.status();
      waiting_for = std::string(reply.status().message());
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "rendezvous: gave up after --rendezvous-timeout-ms=", config_.rendezvous_timeout_ms, ": ",
          waiting_for));
    }
    JOULE_LOG(Info) << "rank " << rank_ << ": waiting for the other ranks: " << waiting_for;
  }
}

absl::Status WorkerProcess::StartServing() {
  ep::ExpertParallelOptions ep_options;
  ep_options.payload = config_.payload == "f32" ? ep::PayloadType::kF32 : ep::PayloadType::kBF16;
  ep_options.shared_windows = config_.shared_windows;
  ep_options.two_batch_overlap = config_.two_batch_overlap;
  ep_options.two_batch_min_rows = config_.two_batch_overlap_min_rows;
  // A GPU worker keeps its rows in device memory and runs its experts there
  // (worker/ep/device_stages.h); a one-rank GPU cluster keeps the model's
  // local executor and its decode graphs.
  std::unique_ptr<ep::ExpertParallelExecutor> executor;
  if (!model_->backend().device_memory_is_host()) {
    ep_options.device = {.backend = &model_->backend(), .resident = &model_->device_weights(),
                         .resident_host = &model_->weights(),
                         .row_transport = RowTransport(transport_.get())};
    // Every executor of this worker (rebalances, regroups) places its experts
    // through one store, so each uploads only what the last did not hold.
    ep_options.device.experts = std::make_shared<DeviceExpertStore>(
        model_->backend(), &model_->device_weights(), &model_->weights());
  }
  if (model_->backend().device_memory_is_host() || world_size_ > 1) {
    const ModelWeights* weights = joined_weights_ ? joined_weights_.get() : &model_->weights();
    executor = std::make_unique<ep::ExpertParallelExecutor>(
        weights, transport_.get(), placement_, model_->stream(), ep_options);
  }
  EngineOptions engine_options;
  engine_options.block_size = config_.block_size;
  engine_options.kv_cache_bytes = config_.kv_cache_mb << 20;
  engine_options.gpu_memory_utilization = config_.gpu_memory_utilization;
  engine_options.max_model_len = config_.max_model_len;
  engine_options.max_batch_tokens = config_.max_batch_tokens;
  engine_options.max_running = config_.max_running;
  engine_options.prefix_caching = config_.prefix_caching;
  // Set before the engine sizes its buffers and KV cache: an expert-parallel
  // rank reserves nothing for the local expert executor it never runs (the
  // runtime sets it again, and restores the local one when it ends).
  if (executor != nullptr) model_->set_expert_executor(executor.get());
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(model_.get(), engine_options));
  RuntimeOptions runtime_options;
  runtime_options.idle_wait = absl::Microseconds(config_.idle_wait_us);
  runtime_options.idle_wait_max = absl::Microseconds(config_.idle_wait_max_us);
  runtime_options.control_interval = config_.control_interval;
  runtime_options.expert_parallel = ep_options;
  runtime_options.injected_step_delay = absl::Microseconds(config_.inject_step_delay_us);
  runtime_options.injected_delay_per_token = absl::Microseconds(config_.inject_delay_per_token_us);
  // Waiting for a new group only helps when the coordinator forms one.
  runtime_options.regroup_timeout =
      elastic_ ? absl::Milliseconds(config_.regroup_timeout_ms) : absl::ZeroDuration();
  // On a GPU, NVML meters the GPU this worker computes on (its PCI bus id).
  ASSIGN_OR_RETURN(energy_meter_, telemetry::MakeEnergyMeter(telemetry::ForComputeDevice(
                                      telemetry::EnergyMeterOptionsFrom(config_),
                                      model_->backend().pci_bus_id())));
  runtime_options.energy_meter = energy_meter_.get();
  runtime_options.group_epoch = group_epoch_;
  runtime_ = std::make_unique<WorkerRuntime>(model_.get(), transport_.get(), std::move(engine),
                                             std::move(executor), placement_epoch_, runtime_options);
  // A joiner's experts: the runtime keeps them as long as its executors use them.
  if (joined_weights_) runtime_->AdoptExpertWeights(std::move(joined_weights_));
  if (!loader_) {
    loader_ = std::make_unique<PlacementLoader>(config_.model, model_config_, rank_, world_size_,
                                                placement_);
  }
  runtime_->Start();
  handler_.set_runtime(runtime_.get());
  heartbeat_ = std::make_unique<HeartbeatLoop>(
      coordinator_, runtime_.get(), loader_.get(),
      HeartbeatOptions{.worker_id = worker_id_,
                       .worker_secret = worker_secret_,
                       .rank = rank_,
                       .interval = heartbeat_interval_,
                       .max_missed = config_.heartbeat_max_missed},
      [this](absl::Status why) {
        {
          absl::MutexLock lock(&mu_);
          stopped_by_coordinator_ = true;
        }
        if (why.ok()) {
          Stop("the coordinator asked this worker to shut down");
        } else {
          Fail(why);
        }
      },
      [this](const v1::GroupUpdate& update) {
        absl::MutexLock lock(&mu_);
        if (!next_group_ || update.epoch() > next_group_->epoch()) next_group_ = update;
      },
      [this](absl::Time sent) {
        absl::MutexLock lock(&mu_);
        // A heartbeat sent before the last registration finished says nothing new.
        if (sent > registered_at_) reregister_ = true;
      });
  heartbeat_->Start();
  regroup_thread_ = std::thread([this] { RegroupLoop(); });
  const WorkerStatus status = runtime_->Status();
  JOULE_LOG(Info) << "rank " << rank_ << " ready: serving on " << endpoint_ << ", KV cache "
                  << status.kv_total_blocks << " blocks of " << config_.block_size << " tokens";
  return absl::OkStatus();
}

absl::Status WorkerProcess::Wait() {
  while (!stop_.WaitForNotificationWithTimeout(absl::Milliseconds(100))) {
    if (runtime_ && runtime_->WaitForExit(absl::ZeroDuration())) {
      absl::Status exit = runtime_->exit_status();
      if (exit.ok()) {
        Stop("step loop stopped");
      } else {
        Fail(exit);
      }
    }
  }
  Shutdown();
  absl::MutexLock lock(&mu_);
  return stop_status_;
}

void WorkerProcess::RegroupLoop() {
  uint64_t tried = 0;  // the newest epoch tried (an overtaken one is not retried)
  while (!stop_.HasBeenNotified()) {
    std::optional<v1::GroupUpdate> update;
    bool reregister = false;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this, tried]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return (next_group_.has_value() && next_group_->epoch() > std::max(group_epoch_, tried)) ||
               reregister_ || stop_.HasBeenNotified();
      };
      mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(200));
      if (next_group_.has_value() && next_group_->epoch() > std::max(group_epoch_, tried)) {
        update = next_group_;
      }
      reregister = std::exchange(reregister_, false);
    }
    if (reregister) {
      if (absl::Status s = Reregister(); !s.ok()) {
        Fail(s);
        return;
      }
      tried = 0;
      continue;
    }
    if (!update) continue;
    tried = update->epoch();
    absl::Status s = Regroup(*update);
    if (s.ok()) continue;
    // A later epoch overtook this one: the next heartbeat brings it.
    if (absl::IsAborted(s) || stop_.HasBeenNotified()) {
      JOULE_LOG(Warning) << "rank " << rank_ << ": group epoch " << update->epoch() << ": " << s;
      continue;
    }
    Fail(Annotate(s, absl::StrCat("regrouping into group epoch ", update->epoch())));
    return;
  }
}

absl::Status WorkerProcess::Regroup(const v1::GroupUpdate& update) {
  JOULE_LOG(Warning) << "rank " << rank_ << ": expert-parallel group epoch " << update.epoch()
                     << " (" << update.reason() << "): regrouping as rank " << update.rank()
                     << " of " << update.world_size();
  if (update.rank() < 0 || update.rank() >= update.world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("group update: rank ", update.rank(),
                                                   " outside a world of ", update.world_size()));
  }
  return SwitchGroup(update.rank(), update.world_size(), update.epoch(), update.epoch(),
                     update.placement(), absl::StrCat("group epoch ", update.epoch(), ": ",
                                                      update.reason()));
}

absl::Status WorkerProcess::SwitchGroup(int transport_rank, int world, uint64_t rendezvous_epoch,
                                        uint64_t epoch, const v1::Placement& placement,
                                        const std::string& why) {
  const absl::Time start = absl::Now();
  // Leave the old group: a step waiting on a peer fails at once.
  transport_->Interrupt(why);
  const absl::Time noticed = absl::Now() + step_timeout_ + absl::Seconds(2);
  while (!runtime_->AwaitingGroup() && !runtime_->WaitForExit(absl::ZeroDuration())) {
    if (absl::Now() > noticed) {
      return absl::DeadlineExceededError("the step loop did not leave the broken group");
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ep::Transport> transport,
                   JoinGroup(transport_rank, world, rendezvous_epoch));
  loader_->Regroup(transport_rank, world);
  ASSIGN_OR_RETURN(PreparedPlacement prepared, loader_->Prepare(placement));
  RETURN_IF_ERROR(runtime_->InstallGroup({.epoch = epoch,
                                          .transport = transport.get(),
                                          .row_transport = RowTransport(transport.get()),
                                          .placement = std::move(prepared)},
                                         step_timeout_ + absl::Seconds(2)));
  transport_ = std::move(transport);  // the old one is no longer used
  group_epoch_ = epoch;
  JOULE_LOG(Warning) << "rank " << rank_ << ": serving in group epoch " << epoch << " after "
                     << absl::FormatDuration(absl::Now() - start) << " (" << why << ")";
  return absl::OkStatus();
}

absl::Status WorkerProcess::Reregister() {
  JOULE_LOG(Warning) << "rank " << rank_ << ": the coordinator does not know this worker (it "
                     << "restarted?): registering again, keeping the loaded weights";
  const int rank = rank_;
  const int world = world_size_;
  RETURN_IF_ERROR(Annotate(Register(rank), "registering with the restarted coordinator"));
  if (rank_ != rank || world_size_ != world || joining_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the restarted coordinator gave rank ", rank_, " of ", world_size_,
        joining_ ? " (joining a running group)" : "", " to this worker, which served rank ", rank,
        " of ", world, "; restart the worker"));
  }
  {
    absl::MutexLock lock(&mu_);
    next_group_.reset();  // the old coordinator's
  }
  heartbeat_->ForgetPlacements();
  // The new coordinator's first group: every rank meets at its initial rendezvous.
  return SwitchGroup(rank_, world_size_, /*rendezvous_epoch=*/0, /*epoch=*/1,
                     PlacementToProto(placement_, placement_epoch_), "the coordinator restarted");
}

void WorkerProcess::Shutdown() {
  std::string reason;
  bool failed;
  bool left;
  {
    absl::MutexLock lock(&mu_);
    reason = stop_reason_;
    failed = !stop_status_.ok();
    left = failed || stopped_by_coordinator_;
  }
  const absl::Duration grace = absl::Milliseconds(config_.shutdown_grace_ms);
  // No regroup may swap the transport from here on (a regroup is bounded by
  // the step timeout).
  if (regroup_thread_.joinable()) regroup_thread_.join();
  if (runtime_) {
    // Every rank stops at the same control round; a lost peer ends the loop
    // within the step timeout, so this wait is bounded.
    if (left) {
      runtime_->Leave(reason);  // not a word to the old group: it re-forms without this rank
    } else {
      runtime_->Stop(reason);
    }
    if (left && transport_) {
      // The group is broken or went on without this rank (it was drained, or
      // left): a step waiting on its peers fails now, not at the step timeout.
      transport_->Interrupt(reason);
    }
    if (!runtime_->WaitForExit(step_timeout_ + grace)) {
      JOULE_LOG(Error) << "rank " << rank_ << ": step loop did not stop in time";
    }
    runtime_->Join();
    if (failed && heartbeat_) {
      // Let the coordinator see "not ready" (and streams read their errors)
      // before the process goes.
      // (the heartbeat thread keeps reporting during the grace period).
      JOULE_LOG(Info) << "rank " << rank_ << ": not serving (" << reason << "); exiting in "
                      << absl::FormatDuration(grace);
      absl::SleepFor(grace);
    }
  }
  metrics_.reset();
  keep_awake_.reset();
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(absl::ToInt64Milliseconds(grace)));
    server_->Wait();
    server_.reset();
  }
  if (heartbeat_) heartbeat_->Stop();
  heartbeat_.reset();
  runtime_.reset();
  loader_.reset();
  transport_.reset();
  model_.reset();
}

}  // namespace joule::worker
