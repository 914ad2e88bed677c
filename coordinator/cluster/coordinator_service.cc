#include "coordinator/cluster/coordinator_service.h"

#include <algorithm>
#include <optional>

#include "common/logging.h"
#include "coordinator/cluster/grpc_util.h"

namespace joule::cluster {
namespace {

// A long poll answers a little before the caller's deadline so the caller gets
// our message rather than its own DEADLINE_EXCEEDED; and never waits forever.
absl::Time LongPollDeadline(const grpc::ServerContext& context) {
  const absl::Time now = absl::Now();
  const absl::Time client = FromChrono(context.deadline());
  return std::clamp(client - absl::Milliseconds(200), now, now + absl::Minutes(5));
}

class WriterSink final : public GenerateSink {
 public:
  WriterSink(grpc::ServerContext* context, grpc::ServerWriter<v1::GenerateResponse>* writer)
      : context_(context), writer_(writer) {}
  bool Write(const v1::GenerateResponse& response) override { return writer_->Write(response); }
  bool ClientGone() const override { return context_->IsCancelled(); }

 private:
  grpc::ServerContext* context_;
  grpc::ServerWriter<v1::GenerateResponse>* writer_;
};

}  // namespace

grpc::Status CoordinatorServiceImpl::Register(grpc::ServerContext* context,
                                              const v1::RegisterRequest* request,
                                              v1::RegisterReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  absl::Status s = membership_->Register(*request, reply);
  if (!s.ok()) {
    JOULE_LOG(Warning) << "refused registration of worker " << request->worker_id() << " from "
                       << context->peer() << ": " << s;
  }
  return ToGrpcStatus(s);
}

grpc::Status CoordinatorServiceImpl::Rendezvous(grpc::ServerContext* context,
                                                const v1::RendezvousRequest* request,
                                                v1::RendezvousReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  return ToGrpcStatus(membership_->Rendezvous(*request, LongPollDeadline(*context), reply));
}

grpc::Status CoordinatorServiceImpl::Heartbeat(grpc::ServerContext* context,
                                               const v1::HeartbeatRequest* request,
                                               v1::HeartbeatReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  return ToGrpcStatus(membership_->Heartbeat(*request, reply));
}

grpc::Status FrontendServiceImpl::Generate(grpc::ServerContext* context,
                                           const v1::GenerateRequest* request,
                                           grpc::ServerWriter<v1::GenerateResponse>* writer) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  WriterSink sink(context, writer);
  return ToGrpcStatus(router_->Generate(*request, FromChrono(context->deadline()), &sink));
}

grpc::Status FrontendServiceImpl::ClusterStatus(grpc::ServerContext* context,
                                                const v1::ClusterStatusRequest* request,
                                                v1::ClusterStatusReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  reply->set_world_size(membership_->world_size());
  reply->set_placement_epoch(membership_->placement_epoch());
  const GroupInfo group = membership_->group();
  reply->set_group_epoch(group.epoch);
  reply->set_serving(group.serving);
  reply->set_group_reason(group.reason);
  for (const RankInfo& r : membership_->Ranks()) {
    v1::RankStatus* out = reply->add_ranks();
    out->set_rank(r.rank);
    out->set_state(std::string(RankStateName(r.state)));
    out->set_worker_endpoint(r.worker_endpoint);
    out->set_running(std::max(r.running, router_->InFlight(r.rank)));
    out->set_reason(r.dead_reason);
    out->set_group_rank(r.group_rank);
    out->set_max_running(r.max_running);
    out->set_max_batch_tokens(r.max_batch_tokens);
    out->set_waiting(r.waiting);
    out->set_kv_usage(r.kv_usage);
  }
  return grpc::Status::OK;
}

grpc::Status FrontendServiceImpl::Rebalance(grpc::ServerContext* context,
                                            const v1::RebalanceRequest* request,
                                            v1::RebalanceReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  std::optional<int> extra;
  if (request->has_redundant_experts()) extra = request->redundant_experts();
  absl::StatusOr<uint64_t> epoch = membership_->Rebalance(extra);
  if (!epoch.ok()) return ToGrpcStatus(epoch.status());
  reply->set_placement_epoch(*epoch);
  return grpc::Status::OK;
}

grpc::Status FrontendServiceImpl::Drain(grpc::ServerContext* context,
                                        const v1::DrainRequest* request, v1::DrainReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return auth;
  absl::StatusOr<uint64_t> epoch = membership_->Drain(request->rank());
  if (!epoch.ok()) return ToGrpcStatus(epoch.status());
  // Its requests resume on the others (the router's resumes); none fails.
  router_->FailRank(request->rank(), "drained (joule-cli drain)");
  JOULE_LOG(Warning) << "rank " << request->rank() << " drained; group epoch " << *epoch
                     << " serves without it";
  reply->set_group_epoch(*epoch);
  return grpc::Status::OK;
}

}  // namespace joule::cluster
