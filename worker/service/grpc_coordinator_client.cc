#include "worker/service/grpc_coordinator_client.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "grpcpp/grpcpp.h"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "worker/service/grpc_status.h"

namespace joule::worker {
namespace {

class GrpcCoordinatorClient : public CoordinatorClient {
 public:
  GrpcCoordinatorClient(const std::string& target, absl::Duration rpc_timeout,
                        const GrpcSecurity& security)
      : target_(target), rpc_timeout_(rpc_timeout) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    // Reconnect quickly after the coordinator restarts.
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
    channel_ = MakeChannel(target, security, args);
    stub_ = v1::Coordinator::NewStub(channel_);
  }

  absl::StatusOr<v1::RegisterReply> Register(const v1::RegisterRequest& request) override {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, rpc_timeout_);
    ctx.set_wait_for_ready(true);  // the coordinator may still be starting
    v1::RegisterReply reply;
    absl::Status s = FromGrpc(stub_->Register(&ctx, request, &reply));
    if (s.code() == absl::StatusCode::kDeadlineExceeded &&
        channel_->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
      s = absl::UnavailableError("no connection to the coordinator (is it running, is the address right?)");
    }
    RETURN_IF_ERROR(Annotate(s, absl::StrCat("Register with coordinator ", target_)));
    return reply;
  }

  absl::StatusOr<v1::RendezvousReply> Rendezvous(const v1::RendezvousRequest& request,
                                                 absl::Duration timeout) override {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, timeout);
    ctx.set_wait_for_ready(true);
    v1::RendezvousReply reply;
    RETURN_IF_ERROR(Annotate(FromGrpc(stub_->Rendezvous(&ctx, request, &reply)),
                             absl::StrCat("Rendezvous with coordinator ", target_)));
    return reply;
  }

  absl::StatusOr<v1::HeartbeatReply> Heartbeat(const v1::HeartbeatRequest& request) override {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, rpc_timeout_);
    v1::HeartbeatReply reply;
    RETURN_IF_ERROR(Annotate(FromGrpc(stub_->Heartbeat(&ctx, request, &reply)),
                             absl::StrCat("Heartbeat to coordinator ", target_)));
    return reply;
  }

 private:
  static void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout)));
  }

  const std::string target_;
  const absl::Duration rpc_timeout_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

}  // namespace

std::unique_ptr<CoordinatorClient> MakeGrpcCoordinatorClient(const std::string& target,
                                                             absl::Duration rpc_timeout,
                                                             const GrpcSecurity& security) {
  return std::make_unique<GrpcCoordinatorClient>(target, rpc_timeout, security);
}

}  // namespace joule::worker
