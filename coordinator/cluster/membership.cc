#include "coordinator/cluster/membership.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/placement_proto.h"
#include "common/secrets.h"
#include "common/status.h"
#include "coordinator/placement/eplb.h"

namespace joule::cluster {
namespace {

constexpr int kWorkerSecretBytes = 16;  // 128 bits

std::string VersionName(int v) {
  return absl::StrCat(v1::ProtocolVersion_IsValid(v)
                          ? v1::ProtocolVersion_Name(static_cast<v1::ProtocolVersion>(v))
                          : std::string("unknown"),
                      " (", v, ")");
}

std::string TransportName(int t) {
  return v1::TransportKind_IsValid(t) ? v1::TransportKind_Name(static_cast<v1::TransportKind>(t))
                                      : absl::StrCat("unknown (", t, ")");
}

// The --transport value of a kind ("nccl"), else its enum name.
std::string TransportFlag(int t) {
  switch (t) {
    case v1::TRANSPORT_KIND_UCX: return "ucx";
    case v1::TRANSPORT_KIND_NCCL: return "nccl";
    case v1::TRANSPORT_KIND_INPROC: return "inproc";
    default: return TransportName(t);
  }
}

// Contiguous sharding with dense layers left empty.
absl::StatusOr<Placement> InitialPlacement(int world_size, const ModelSummary& model) {
  auto p = ContiguousPlacement(world_size, model.num_layers, model.num_experts);
  if (!p.ok()) return p.status();
  for (int l = 0; l < model.num_layers; ++l) {
    if (!model.moe_layer[l]) p->replicas[l].clear();
  }
  return p;
}

}  // namespace

std::string_view RankStateName(RankState state) {
  switch (state) {
    case RankState::kFree: return "free";
    case RankState::kRegistered: return "registered";
    case RankState::kReady: return "ready";
    case RankState::kDead: return "dead";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<Membership>> Membership::Create(MembershipOptions options,
                                                               ModelSummary model,
                                                               const Clock* clock) {
  if (options.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--workers must be at least 1, got ", options.world_size));
  }
  if (options.heartbeat_interval <= absl::ZeroDuration() || options.heartbeat_misses < 1) {
    return absl::InvalidArgumentError("--heartbeat-ms must be positive");
  }
  if (options.redundant_experts < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--redundant-experts must not be negative, got ",
                                                   options.redundant_experts));
  }
  if (static_cast<int>(model.moe_layer.size()) != model.num_layers) {
    return absl::InvalidArgumentError("model summary: moe_layer does not cover every layer");
  }
  auto initial = InitialPlacement(options.world_size, model);
  if (!initial.ok()) return initial.status();
  return std::unique_ptr<Membership>(
      new Membership(std::move(options), std::move(model), clock, *std::move(initial)));
}

Membership::Membership(MembershipOptions options, ModelSummary model, const Clock* clock,
                       Placement initial)
    : options_(std::move(options)),
      model_(std::move(model)),
      clock_(clock),
      base_(initial),
      slots_(options_.world_size),
      placement_(std::move(initial)) {
  for (int r = 0; r < options_.world_size; ++r) slots_[r].info.rank = r;
  load_.resize(model_.num_layers);
  for (int l = 0; l < model_.num_layers; ++l) {
    if (model_.moe_layer[l]) load_[l].assign(model_.num_experts, 0);
  }
}

void Membership::FillRegisterReplyLocked(int rank, v1::RegisterReply* reply) const {
  reply->set_rank(rank);
  reply->set_world_size(options_.world_size);
  *reply->mutable_placement() = PlacementToProto(placement_, epoch_);
  reply->set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
  reply->set_step_timeout_ms(absl::ToInt64Milliseconds(options_.step_timeout));
  reply->set_elastic(options_.elastic);
  reply->set_joining(slots_[rank].joining);
  reply->set_worker_secret(slots_[rank].worker_secret);
}

absl::Status Membership::CheckHolderLocked(const Slot& s, const std::string& worker_id,
                                           const std::string& secret,
                                           absl::string_view next_step) const {
  if (s.info.state == RankState::kFree || s.info.worker_id != worker_id) {
    return absl::NotFoundError(absl::StrCat("rank ", s.info.rank, " is not held by worker ",
                                            worker_id, "; ", next_step));
  }
  // A worker id shows in logs; the secret went only to the worker in its RegisterReply.
  if (!SecretEquals(secret, s.worker_secret)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "worker_secret: not the one issued to rank ", s.info.rank, "'s registration"));
  }
  return absl::OkStatus();
}

namespace {

// "cuda" of "cuda:3"; "cpu" of "cpu" (an empty device is a CPU).
std::string DeviceKind(const std::string& device) {
  const std::string kind = device.substr(0, device.find(':'));
  return kind.empty() ? "cpu" : kind;
}

// 0 is an older worker's (unknown); below that the request is broken.
absl::Status CheckEngineLimits(const v1::RegisterRequest& request) {
  const std::pair<const char*, int> limits[] = {{"max_running", request.max_running()},
                                                {"max_batch_tokens", request.max_batch_tokens()}};
  for (const auto& [field, value] : limits) {
    if (value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": must not be negative, got ", value, " (0: unknown)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Membership::Register(const v1::RegisterRequest& request, v1::RegisterReply* reply) {
  if (request.protocol_version() != v1::PROTOCOL_VERSION_1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "protocol_version ", VersionName(request.protocol_version()),
        " is not supported: this coordinator speaks ", VersionName(v1::PROTOCOL_VERSION_1),
        "; run a joule-worker built from the same release"));
  }
  if (request.model_fingerprint() != options_.model_fingerprint) {
    // The caller learns the reason; our fingerprint and path are for the log.
    JOULE_LOG(Warning) << "worker " << request.worker_id() << " has model fingerprint "
                       << (request.model_fingerprint().empty() ? "(empty)" : request.model_fingerprint())
                       << ", this coordinator " << options_.model_fingerprint << " (model "
                       << options_.model_dir << ")";
    return absl::FailedPreconditionError(
        "model fingerprint does not match the coordinator's model: start the worker with the same checkpoint");
  }
  if (request.worker_id().empty()) {
    return absl::InvalidArgumentError("worker_id: must not be empty");
  }
  if (request.worker_endpoint().empty()) {
    return absl::InvalidArgumentError(
        "worker_endpoint: must name the worker's gRPC server (host:port)");
  }
  RETURN_IF_ERROR(CheckEngineLimits(request));
  const int n = options_.world_size;
  const int requested = request.requested_rank();
  if (requested < -1 || requested >= n) {
    return absl::InvalidArgumentError(absl::StrCat("requested_rank ", requested,
                                                   " is out of range [0, ", n,
                                                   ") (-1 asks for any free rank)"));
  }

  absl::MutexLock lock(&mu_);
  if (shutdown_) return absl::UnavailableError("coordinator is shutting down");
  // One transport per group (the coordinator's --transport): a UCX rank and
  // an NCCL rank cannot meet. Names the ranks already registered with it.
  if (request.transport() != options_.transport) {
    std::vector<int> holders;
    std::string holder_ids;
    for (const Slot& s : slots_) {
      if (Live(s) && s.info.worker_id != request.worker_id()) {
        holders.push_back(s.info.rank);
        absl::StrAppend(&holder_ids, holder_ids.empty() ? "" : ", ", s.info.worker_id);
      }
    }
    JOULE_LOG(Warning) << "worker " << request.worker_id() << " uses transport "
                       << TransportName(request.transport()) << ", the group "
                       << TransportName(options_.transport)
                       << (holders.empty() ? "" : absl::StrCat(" (workers ", holder_ids, ")"));
    // Other workers' ids are for the log; their ranks are enough for the caller.
    return absl::FailedPreconditionError(absl::StrCat(
        "transport: this worker uses ", TransportFlag(request.transport()),
        " (joule-worker --transport ", TransportFlag(request.transport()), ") but the group uses ",
        TransportFlag(options_.transport), " (joule-coordinator --transport ",
        TransportFlag(options_.transport),
        holders.empty() ? ""
                        : absl::StrCat("; rank", holders.size() > 1 ? "s " : " ",
                                       absl::StrJoin(holders, ", "), " registered with it"),
        "); every rank of a group uses one transport"));
  }
  // One kind of device per group: the ranks' collectives and shared windows
  // must be of one kind (host memory, or GPU memory through NCCL / CUDA IPC).
  for (const Slot& s : slots_) {
    if (Live(s) && s.info.worker_id != request.worker_id() &&
        DeviceKind(s.info.device) != DeviceKind(request.device())) {
      JOULE_LOG(Warning) << "worker " << request.worker_id() << " computes on " << request.device()
                         << " but rank " << s.info.rank << " (worker " << s.info.worker_id << ") on "
                         << s.info.device;
      return absl::FailedPreconditionError(absl::StrCat(
          "device: this worker computes on ", DeviceKind(request.device()), " but rank ", s.info.rank, " on ",
          DeviceKind(s.info.device), "; every rank of a group uses one kind of device (--device)"));
    }
  }
  // The same process again (its reply was lost, or it restarted its client).
  for (const Slot& s : slots_) {
    if (Live(s) && s.info.worker_id == request.worker_id()) {
      if (requested != -1 && requested != s.info.rank) {
        return absl::AlreadyExistsError(absl::StrCat("worker ", request.worker_id(),
                                                     " already holds rank ", s.info.rank,
                                                     ", not the requested rank ", requested));
      }
      Slot& same = slots_[s.info.rank];
      same.worker_secret = RandomHex(kWorkerSecretBytes);
      same.info.max_running = request.max_running();
      same.info.max_batch_tokens = request.max_batch_tokens();
      FillRegisterReplyLocked(s.info.rank, reply);
      return absl::OkStatus();
    }
  }
  int rank = requested;
  if (rank >= 0) {
    const Slot& s = slots_[rank];
    if (Live(s)) {
      // The holder's id and address are for the log, not for whoever asks.
      JOULE_LOG(Warning) << "worker " << request.worker_id() << " asked for rank " << rank
                         << ", held by live worker " << s.info.worker_id << " at " << s.info.worker_endpoint;
      return absl::AlreadyExistsError(absl::StrCat("rank ", rank, " is taken"));
    }
  } else {
    for (const Slot& s : slots_) {
      if (!Live(s)) {
        rank = s.info.rank;
        break;
      }
    }
    if (rank < 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cluster is full: all ", n, " ranks are held by live workers (--workers ", n, ")"));
    }
  }
  Slot& s = slots_[rank];
  const bool replacing = s.info.state == RankState::kDead;
  // A new worker's meter starts from 0; the same worker (registering again)
  // goes on from what it reported. The rank's total keeps growing either way.
  if (request.worker_id() != s.info.worker_id) s.energy_reported = 0;
  s.info = RankInfo{.rank = rank,
                    .state = RankState::kRegistered,
                    .worker_id = request.worker_id(),
                    .worker_endpoint = request.worker_endpoint(),
                    .host = request.host(),
                    .device = request.device(),
                    .max_running = request.max_running(),
                    .max_batch_tokens = request.max_batch_tokens(),
                    .energy_joules = s.info.energy_joules,
                    .energy_source = s.info.energy_source};
  s.transport_address = request.transport_address();
  s.last_seen = clock_->Now();
  s.heartbeated = false;
  s.probe = 0;  // a new holder: the old one's probe judges nobody
  // The group runs without this rank (it left): the worker joins it once loaded.
  s.joining = options_.elastic && group_epoch_ > 0 && GroupRankLocked(rank) < 0;
  s.drained = false;
  s.worker_secret = RandomHex(kWorkerSecretBytes);
  if (rank == 0) {
    rank0_rendezvous_ = false;
    nccl_unique_id_.clear();
  }
  JOULE_LOG(Info) << "rank " << rank << (replacing ? " replaced by" : " registered to") << " worker "
                  << request.worker_id() << " at " << request.worker_endpoint() << " ("
                  << request.device() << ")"
                  << (s.joining ? "; it joins the running group once loaded" : "");
  FillRegisterReplyLocked(rank, reply);
  return absl::OkStatus();
}

bool Membership::FormedLocked() const {
  for (const Slot& s : slots_) {
    if (!Live(s)) return false;
    if (options_.transport == v1::TRANSPORT_KIND_UCX && s.transport_address.empty()) return false;
  }
  return options_.transport != v1::TRANSPORT_KIND_NCCL || rank0_rendezvous_;
}

std::string Membership::MissingRanksLocked() const {
  std::string out;
  for (const Slot& s : slots_) {
    if (Live(s)) {
      if (options_.transport == v1::TRANSPORT_KIND_UCX && s.transport_address.empty()) {
        absl::StrAppend(&out, out.empty() ? "" : ", ", s.info.rank,
                        " (registered, no transport address yet)");
      }
      continue;
    }
    absl::StrAppend(&out, out.empty() ? "" : ", ", s.info.rank, " (",
                    std::string(RankStateName(s.info.state)), ")");
  }
  if (out.empty() && options_.transport == v1::TRANSPORT_KIND_NCCL && !rank0_rendezvous_) {
    out = "rank 0's NCCL unique id";
  }
  return out;
}

absl::Status Membership::Rendezvous(const v1::RendezvousRequest& request, absl::Time deadline,
                                    v1::RendezvousReply* reply) {
  const int n = options_.world_size;
  if (request.rank() < 0 || request.rank() >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", request.rank(), " is out of range [0, ", n, ")"));
  }
  absl::MutexLock lock(&mu_);
  Slot& mine = slots_[request.rank()];
  if (!Live(mine) || mine.info.worker_id != request.worker_id()) {
    return absl::NotFoundError(absl::StrCat("rank ", request.rank(), " is not held by worker ",
                                            request.worker_id(), "; register first"));
  }
  RETURN_IF_ERROR(
      CheckHolderLocked(mine, request.worker_id(), request.worker_secret(), "register first"));
  if (request.group_epoch() > 0) return GroupRendezvousLocked(request, deadline, reply);
  if (!request.transport_address().empty()) mine.transport_address = request.transport_address();
  mine.last_seen = clock_->Now();
  if (request.rank() == 0) {
    rank0_rendezvous_ = true;
    nccl_unique_id_ = request.nccl_unique_id();
  }
  auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return shutdown_ || FormedLocked(); };
  mu_.AwaitWithDeadline(absl::Condition(&done), deadline);
  if (shutdown_) return absl::UnavailableError("coordinator is shutting down");
  if (!FormedLocked()) {
    return absl::DeadlineExceededError(
        absl::StrCat("rendezvous: still waiting for rank(s) ", MissingRanksLocked(), " of ", n,
                     "; call Rendezvous again"));
  }
  if (group_epoch_ == 0) {  // the first group: every rank, in rank order
    group_epoch_ = 1;
    group_.clear();
    group_addresses_.clear();
    for (const Slot& s : slots_) {
      group_.push_back(s.info.rank);
      group_addresses_.push_back(s.transport_address);
    }
    group_reason_ = "every rank registered";
    JOULE_LOG(Info) << "expert-parallel group epoch 1: ranks 0.." << n - 1;
  }
  for (const Slot& s : slots_) {
    v1::PeerInfo* peer = reply->add_peers();
    peer->set_rank(s.info.rank);
    peer->set_transport_address(s.transport_address);
    peer->set_worker_endpoint(s.info.worker_endpoint);
  }
  reply->set_nccl_unique_id(nccl_unique_id_);
  reply->set_group_epoch(1);
  return absl::OkStatus();
}

absl::Status Membership::GroupRendezvousLocked(const v1::RendezvousRequest& request,
                                               absl::Time deadline, v1::RendezvousReply* reply) {
  const uint64_t epoch = request.group_epoch();
  auto moved_on = [&] {
    return absl::AbortedError(absl::StrCat("rendezvous for group epoch ", epoch,
                                           ": the group has moved on to epoch ", group_epoch_,
                                           " (", group_reason_, ")"));
  };
  if (epoch != group_epoch_) {
    if (epoch < group_epoch_) return moved_on();
    return absl::InvalidArgumentError(absl::StrCat("group_epoch ", epoch, " is ahead of the ",
                                                   "coordinator's ", group_epoch_));
  }
  const int g = GroupRankLocked(request.rank());
  if (g < 0) {
    return absl::FailedPreconditionError(absl::StrCat("rank ", request.rank(),
                                                      " is not a member of group epoch ", epoch));
  }
  if (request.transport_address().empty()) {
    return absl::InvalidArgumentError("transport_address: a group rendezvous needs this epoch's");
  }
  group_addresses_[g] = request.transport_address();
  slots_[request.rank()].last_seen = clock_->Now();
  auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (shutdown_ || group_epoch_ != epoch) return true;
    for (const std::string& a : group_addresses_) {
      if (a.empty()) return false;
    }
    return true;
  };
  mu_.AwaitWithDeadline(absl::Condition(&done), deadline);
  if (shutdown_) return absl::UnavailableError("coordinator is shutting down");
  if (group_epoch_ != epoch) return moved_on();
  std::string missing;
  for (size_t i = 0; i < group_.size(); ++i) {
    if (group_addresses_[i].empty()) absl::StrAppend(&missing, missing.empty() ? "" : ", ", group_[i]);
  }
  if (!missing.empty()) {
    return absl::DeadlineExceededError(absl::StrCat("rendezvous for group epoch ", epoch,
                                                    ": still waiting for rank(s) ", missing,
                                                    "; call Rendezvous again"));
  }
  for (size_t i = 0; i < group_.size(); ++i) {
    v1::PeerInfo* peer = reply->add_peers();
    peer->set_rank(static_cast<int>(i));
    peer->set_transport_address(group_addresses_[i]);
    peer->set_worker_endpoint(slots_[group_[i]].info.worker_endpoint);
  }
  reply->set_group_epoch(epoch);
  return absl::OkStatus();
}

int Membership::GroupRankLocked(int rank) const {
  for (size_t i = 0; i < group_.size(); ++i) {
    if (group_[i] == rank) return static_cast<int>(i);
  }
  return -1;
}

bool Membership::ServingLocked() const {
  if (group_epoch_ == 0 || group_.empty()) return false;
  for (int r : group_) {
    const RankInfo& info = slots_[r].info;
    if (info.state != RankState::kReady || std::max<uint64_t>(info.group_epoch, 1) != group_epoch_) {
      return false;
    }
  }
  return true;
}

void Membership::MemberDiedLocked(int rank, const std::string& reason) {
  ++rank_failures_;
  if (!options_.elastic || group_epoch_ == 0 || GroupRankLocked(rank) < 0) return;
  std::vector<int> members;
  for (int r : group_) {
    if (Live(slots_[r])) members.push_back(r);
  }
  // A second death during a recovery extends it: it ends when a group serves.
  if (!members.empty() && !recovering_since_.has_value()) recovering_since_ = clock_->Now();
  OpenGroupLocked(std::move(members), absl::StrCat("rank ", rank, " died: ", reason));
}

void Membership::OpenGroupLocked(std::vector<int> members, std::string reason) {
  std::sort(members.begin(), members.end());
  const std::vector<int> before = group_;
  ++group_epoch_;
  group_ = members;
  group_addresses_.assign(members.size(), "");
  group_reason_ = std::move(reason);
  if (members.empty()) {
    JOULE_LOG(Error) << "expert-parallel group epoch " << group_epoch_ << ": no rank left ("
                     << group_reason_ << ")";
    return;
  }
  if (absl::Status s = PlaceOverGroupLocked(before); !s.ok()) {
    JOULE_LOG(Error) << "expert-parallel group epoch " << group_epoch_ << ": " << s;
  }
  JOULE_LOG(Warning) << "expert-parallel group epoch " << group_epoch_ << ": " << group_reason_
                     << "; " << members.size() << " rank(s) regroup (ranks "
                     << absl::StrJoin(members, ",") << "), placement epoch " << epoch_;
}

absl::StatusOr<uint64_t> Membership::Drain(int rank) {
  absl::MutexLock lock(&mu_);
  if (rank < 0 || rank >= options_.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank: ", rank, " is out of range [0, ", options_.world_size, ")"));
  }
  if (!options_.elastic) {
    return absl::FailedPreconditionError(
        "draining needs elastic groups (the coordinator runs with --elastic=false)");
  }
  if (group_epoch_ == 0 || GroupRankLocked(rank) < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", rank, " is not a member of the expert-parallel group (epoch ", group_epoch_, ")"));
  }
  if (group_.size() == 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("rank ", rank, " is the group's last member: nobody would serve"));
  }
  Slot& s = slots_[rank];
  s.info.state = RankState::kDead;
  s.info.dead_reason = "drained (joule-cli drain)";
  s.drained = true;
  std::vector<int> members;
  for (int r : group_) {
    if (r != rank) members.push_back(r);
  }
  OpenGroupLocked(std::move(members), absl::StrCat("rank ", rank, " drained"));
  return group_epoch_;
}

absl::Status Membership::PlaceOverGroupLocked(const std::vector<int>& before) {
  const bool only_left = std::all_of(group_.begin(), group_.end(), [&](int r) {
    return std::find(before.begin(), before.end(), r) != before.end();
  });
  Placement placement, base;
  if (only_left && static_cast<size_t>(placement_.num_ranks) == before.size()) {
    // Members left: every replica on a member stays (nothing to load for it);
    // only what the leavers alone held moves. Highest index first, so the
    // lower ones still mean the same member.
    placement = placement_;
    base = base_;
    for (int i = static_cast<int>(before.size()) - 1; i >= 0; --i) {
      if (std::find(group_.begin(), group_.end(), before[i]) != group_.end()) continue;
      ASSIGN_OR_RETURN(placement, RemoveRank(placement, i));
      ASSIGN_OR_RETURN(base, RemoveRank(base, i));
    }
  } else {
    // A member joined: contiguous sharding over everyone (it gets its share).
    ASSIGN_OR_RETURN(placement, InitialPlacement(static_cast<int>(group_.size()), model_));
    base = placement;
  }
  base_ = std::move(base);
  placement_ = std::move(placement);
  ++epoch_;
  for (auto& layer : load_) std::fill(layer.begin(), layer.end(), 0);
  return absl::OkStatus();
}

MembershipStats Membership::stats() const {
  absl::MutexLock lock(&mu_);
  MembershipStats stats{.group_epoch = group_epoch_,
                        .rank_failures = rank_failures_,
                        .heartbeats_late = heartbeats_late_,
                        .recovery_seconds = recovery_seconds_,
                        .ep_load_imbalance = LoadImbalance(placement_, load_)};
  for (const Slot& s : slots_) {
    if (!s.info.energy_source.empty()) stats.metered.push_back(s.info);
  }
  return stats;
}

void Membership::RecordEnergyLocked(const v1::HeartbeatRequest& request, Slot* s) {
  if (request.energy_source().empty()) return;  // no meter on that worker
  const double reported = request.energy_joules();
  // A meter total below the last one: its worker restarted under the same id.
  const double grew = reported >= s->energy_reported ? reported - s->energy_reported : reported;
  s->energy_reported = reported;
  s->info.energy_joules += grew;
  s->info.power_watts = request.power_watts();
  s->info.energy_source = request.energy_source();
}

GroupInfo Membership::group() const {
  absl::MutexLock lock(&mu_);
  return {.epoch = group_epoch_, .members = group_, .serving = ServingLocked(),
          .reason = group_reason_};
}

absl::Status Membership::Heartbeat(const v1::HeartbeatRequest& request, v1::HeartbeatReply* reply) {
  const int n = options_.world_size;
  if (request.rank() < 0 || request.rank() >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", request.rank(), " is out of range [0, ", n, ")"));
  }
  // Validate the load report before touching any state.
  for (int i = 0; i < request.expert_load_size(); ++i) {
    const v1::ExpertLoad& el = request.expert_load(i);
    if (el.layer() < 0 || el.layer() >= model_.num_layers || !model_.moe_layer[el.layer()]) {
      return absl::InvalidArgumentError(absl::StrCat("expert_load[", i, "].layer: ", el.layer(),
                                                     " is not a MoE layer of the model"));
    }
    if (el.tokens_size() != model_.num_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert_load[", i, "].tokens: has ", el.tokens_size(),
                       " entries, expected one per expert (", model_.num_experts, ")"));
    }
  }
  std::vector<scheduler::StepSample> steps;
  steps.reserve(request.steps_size());
  for (int i = 0; i < request.steps_size(); ++i) {
    const v1::StepRecord& r = request.steps(i);
    const auto bad = [&](absl::string_view field, absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat("steps[", i, "].", field, ": ", why));
    };
    if (r.batch_tokens() < 1) return bad("batch_tokens", "must be at least 1");
    if (r.context_tokens() < 0) return bad("context_tokens", "must not be negative");
    if (!std::isfinite(r.seconds()) || r.seconds() < 0) {
      return bad("seconds", "must be a finite, non-negative duration");
    }
    if (!std::isfinite(r.energy_joules()) || r.energy_joules() < 0) {
      return bad("energy_joules", "must be finite and non-negative");
    }
    steps.push_back(scheduler::StepSample{.batch_tokens = r.batch_tokens(),
                                          .context_tokens = r.context_tokens(),
                                          .duration = absl::Seconds(r.seconds()),
                                          .energy_joules = r.energy_joules(),
                                          .ended_at = r.ended_unix_micros() > 0
                                                          ? absl::FromUnixMicros(r.ended_unix_micros())
                                                          : absl::InfinitePast()});
  }
  StepObserver observer;
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(HeartbeatLocked(request, reply));
    observer = step_observer_;
  }
  // Outside the lock: the observer (the scheduler) takes its own.
  if (observer && !steps.empty()) observer(request.rank(), steps);
  return absl::OkStatus();
}

void Membership::SetStepObserver(StepObserver observer) {
  absl::MutexLock lock(&mu_);
  step_observer_ = std::move(observer);
}

absl::Status Membership::HeartbeatLocked(const v1::HeartbeatRequest& request,
                                         v1::HeartbeatReply* reply) {
  Slot& s = slots_[request.rank()];
  RETURN_IF_ERROR(
      CheckHolderLocked(s, request.worker_id(), request.worker_secret(), "register again"));
  const bool outside = options_.elastic && group_epoch_ > 0 && GroupRankLocked(request.rank()) < 0;
  if (outside && s.joining) {
    s.last_seen = clock_->Now();
    s.heartbeated = true;
    s.probe = 0;
    if (!request.join()) return absl::OkStatus();  // still loading
    std::vector<int> members = group_;
    members.push_back(request.rank());
    s.joining = false;
    OpenGroupLocked(std::move(members), absl::StrCat("rank ", request.rank(), " joined"));
    // Falls through: the reply carries the new group.
  } else if (outside) {
    // Drained (a clean stop), or it left the group (marked dead while silent,
    // e.g. stopped): the others moved on without it, and it stays out.
    reply->set_shutdown(true);
    if (!s.drained) {
      reply->set_shutdown_reason(absl::StrCat("rank ", request.rank(), " is no longer in the ",
                                              "expert-parallel group (epoch ", group_epoch_, ": ",
                                              group_reason_, ")"));
    }
    return absl::OkStatus();
  }
  if (s.info.state == RankState::kDead) {
    JOULE_LOG(Warning) << "rank " << s.info.rank << " is alive again (was dead: "
                       << s.info.dead_reason << ")";
    s.info.dead_reason.clear();
  }
  s.info.state = request.ready() ? RankState::kReady : RankState::kRegistered;
  s.info.running = request.running();
  s.info.waiting = request.waiting();
  s.info.kv_usage = request.kv_usage();
  s.info.placement_epoch = request.placement_epoch();
  s.info.group_epoch = request.group_epoch();
  s.last_seen = clock_->Now();
  s.heartbeated = true;
  s.probe = 0;  // alive: an open suspicion's outcome no longer matters
  RecordEnergyLocked(request, &s);
  for (const v1::ExpertLoad& el : request.expert_load()) {
    auto& layer = load_[el.layer()];
    for (int e = 0; e < el.tokens_size(); ++e) layer[e] += std::max<int64_t>(el.tokens(e), 0);
  }
  if (recovering_since_.has_value() && ServingLocked()) {
    const absl::Duration took = clock_->Now() - *recovering_since_;
    recovery_seconds_.push_back(absl::ToDoubleSeconds(took));
    recovering_since_.reset();
    JOULE_LOG(Warning) << "expert-parallel group epoch " << group_epoch_ << " serves again ("
                       << group_.size() << " rank(s)), " << absl::FormatDuration(took)
                       << " after " << group_reason_;
  }
  const int g = GroupRankLocked(request.rank());
  if (group_epoch_ > 1 && request.group_epoch() != group_epoch_) {
    v1::GroupUpdate* update = reply->mutable_group();
    update->set_epoch(group_epoch_);
    update->set_world_size(static_cast<int>(group_.size()));
    update->set_rank(g);
    *update->mutable_placement() = PlacementToProto(placement_, epoch_);
    update->set_reason(group_reason_);
    return absl::OkStatus();
  }
  if (request.placement_epoch() != epoch_) {
    *reply->mutable_placement() = PlacementToProto(placement_, epoch_);
  }
  return absl::OkStatus();
}

std::string Membership::HeartbeatLostReason(absl::Duration silent) const {
  return absl::StrCat("heartbeat lost (none for ", absl::ToInt64Milliseconds(silent), " ms, limit ",
                      options_.heartbeat_misses, " x ",
                      absl::ToInt64Milliseconds(options_.heartbeat_interval), " ms)");
}

HeartbeatExpiry Membership::ExpireHeartbeats() {
  const absl::Time now = clock_->Now();
  HeartbeatExpiry out;
  absl::MutexLock lock(&mu_);
  for (Slot& s : slots_) {
    if (!Live(s)) continue;
    if (std::optional<std::string> reason = JudgeSilenceLocked(&s, now, &out.suspects)) {
      MarkDeadLocked(&s, *reason);
      out.dead.push_back({s.info.rank, s.info.dead_reason});
    }
  }
  for (const DeadRank& d : out.dead) MemberDiedLocked(d.rank, d.reason);
  return out;
}

std::optional<std::string> Membership::JudgeSilenceLocked(Slot* s, absl::Time now,
                                                          std::vector<SuspectRank>* suspects) {
  const absl::Duration limit = HeartbeatLimit();
  const absl::Duration silent = now - s->last_seen;
  if (!s->heartbeated) {
    if (silent <= options_.startup_timeout) return std::nullopt;
    return absl::StrCat("no heartbeat within ", absl::ToInt64Seconds(silent),
                        " s of registering (startup timeout ",
                        absl::ToInt64Seconds(options_.startup_timeout), " s)");
  }
  if (s->probe != 0) {  // an open suspicion: its outcome counts once past the limit
    if (silent <= limit || !s->probe_outcome.has_value()) return std::nullopt;
    if (s->probe_outcome->ok()) {
      KeepLocked(s);
      return std::nullopt;
    }
    return ProbeFailedReason(silent, *s->probe_outcome);
  }
  if (s->kept_at > s->last_seen) {
    // A probe kept it a whole limit ago and still no heartbeat: its worker
    // answers RPCs but its heartbeats do not arrive, which no probe mends.
    if (now - s->kept_at <= limit) return std::nullopt;
    return absl::StrCat(HeartbeatLostReason(silent), "; its status probe answered ",
                        absl::ToInt64Milliseconds(now - s->kept_at),
                        " ms ago, yet no heartbeat since");
  }
  if (silent > limit / 2) {
    s->probe = ++last_probe_;
    s->probe_outcome.reset();
    suspects->push_back({.rank = s->info.rank,
                         .probe = s->probe,
                         .worker_id = s->info.worker_id,
                         .worker_endpoint = s->info.worker_endpoint});
    JOULE_LOG(Info) << "rank " << s->info.rank << " (worker " << s->info.worker_id
                    << "): no heartbeat for " << absl::ToInt64Milliseconds(silent)
                    << " ms (half the limit passed); probing its status";
  }
  return std::nullopt;
}

std::string Membership::ProbeFailedReason(absl::Duration silent, const absl::Status& error) const {
  return absl::StrCat(HeartbeatLostReason(silent), "; status probe: ", error.message());
}

Membership::Slot* Membership::SuspectLocked(const SuspectRank& suspect) {
  if (suspect.rank < 0 || suspect.rank >= options_.world_size || suspect.probe == 0) return nullptr;
  Slot& s = slots_[suspect.rank];
  const bool open = Live(s) && s.probe == suspect.probe && s.info.worker_id == suspect.worker_id;
  return open ? &s : nullptr;
}

void Membership::KeepLocked(Slot* s) {
  s->probe = 0;
  s->kept_at = clock_->Now();
  ++heartbeats_late_;
  JOULE_LOG(Warning) << "rank " << s->info.rank << " missed heartbeats for "
                     << absl::ToInt64Milliseconds(s->kept_at - s->last_seen)
                     << " ms but answered its status probe: kept (host overloaded?)";
}

bool Membership::KeepSuspect(const SuspectRank& suspect) {
  absl::MutexLock lock(&mu_);
  Slot* s = SuspectLocked(suspect);
  if (s == nullptr) return false;
  if (clock_->Now() - s->last_seen > HeartbeatLimit()) {
    KeepLocked(s);
  } else {
    s->probe_outcome = absl::OkStatus();  // judged once past the limit
  }
  return true;
}

std::optional<DeadRank> Membership::SuspectDead(const SuspectRank& suspect, const absl::Status& error,
                                                bool gone) {
  absl::MutexLock lock(&mu_);
  Slot* s = SuspectLocked(suspect);
  if (s == nullptr) return std::nullopt;
  const absl::Duration silent = clock_->Now() - s->last_seen;
  if (silent <= HeartbeatLimit() && !gone) {
    s->probe_outcome = error.ok() ? absl::UnknownError("status probe failed") : error;
    return std::nullopt;  // ExpireHeartbeats marks it dead once past the limit
  }
  s->probe = 0;
  std::string reason = ProbeFailedReason(silent, error);
  if (gone) absl::StrAppend(&reason, "; its endpoint ", s->info.worker_endpoint, " refuses connections");
  MarkDeadLocked(s, reason);
  MemberDiedLocked(suspect.rank, s->info.dead_reason);
  return DeadRank{suspect.rank, s->info.dead_reason};
}

void Membership::MarkDeadLocked(Slot* s, const std::string& reason) {
  s->info.state = RankState::kDead;
  s->info.dead_reason = reason;
  JOULE_LOG(Error) << "rank " << s->info.rank << " (worker " << s->info.worker_id
                   << ") died: " << reason;
}

bool Membership::MarkDead(int rank, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (rank < 0 || rank >= options_.world_size || !Live(slots_[rank])) return false;
  MarkDeadLocked(&slots_[rank], reason);
  MemberDiedLocked(rank, reason);
  return true;
}

absl::StatusOr<uint64_t> Membership::Rebalance(std::optional<int> redundant_experts) {
  const int extra = redundant_experts.value_or(options_.redundant_experts);
  if (extra < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("redundant_experts: must not be negative, got ", extra));
  }
  absl::MutexLock lock(&mu_);
  const int ranks = static_cast<int>(base_.num_ranks);
  const int max_extra = model_.num_experts * (ranks - 1);
  if (extra > max_extra) {
    return absl::InvalidArgumentError(absl::StrCat(
        "redundant_experts: ", extra, " is more than fit: with ", model_.num_experts,
        " experts on ", ranks, " ranks at most ", max_extra,
        " extra replicas per layer are possible"));
  }
  auto next = RebalancePlacement(base_, load_, extra);
  if (!next.ok()) return next.status();
  placement_ = *std::move(next);
  ++epoch_;
  for (auto& layer : load_) std::fill(layer.begin(), layer.end(), 0);
  JOULE_LOG(Info) << "placement epoch " << epoch_ << ": " << extra
                  << " redundant expert replica(s) per MoE layer";
  return epoch_;
}

void Membership::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
}

std::vector<RankInfo> Membership::Ranks() const {
  absl::MutexLock lock(&mu_);
  std::vector<RankInfo> out;
  out.reserve(slots_.size());
  for (const Slot& s : slots_) {
    out.push_back(s.info);
    out.back().group_rank = GroupRankLocked(s.info.rank);
  }
  return out;
}

uint64_t Membership::placement_epoch() const {
  absl::MutexLock lock(&mu_);
  return epoch_;
}

Placement Membership::placement() const {
  absl::MutexLock lock(&mu_);
  return placement_;
}

std::vector<std::vector<int64_t>> Membership::expert_load() const {
  absl::MutexLock lock(&mu_);
  return load_;
}

}  // namespace joule::cluster
