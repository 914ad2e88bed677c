#include "coordinator/cluster/grpc_worker_client.h"

#include <grpcpp/grpcpp.h>

#include <utility>

#include "coordinator/cluster/grpc_util.h"
#include "proto/joule/v1/generate.grpc.pb.h"

namespace joule::cluster {
namespace {

// One Worker.Generate call on gRPC's callback API: no thread waits on it;
// gRPC's callback threads run OnReadDone/OnDone when messages arrive.
class GrpcGenerateCall final : public GenerateCall,
                               public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  explicit GrpcGenerateCall(std::shared_ptr<GenerateObserver> observer)
      : observer_(std::move(observer)) {}

  static std::shared_ptr<GrpcGenerateCall> Start(v1::Worker::Stub* stub,
                                                 const v1::GenerateRequest& request,
                                                 absl::Time deadline,
                                                 std::shared_ptr<GenerateObserver> observer) {
    auto call = std::make_shared<GrpcGenerateCall>(std::move(observer));
    // gRPC holds a raw pointer to the reactor until OnDone: keep it alive.
    call->self_ = call;
    call->request_ = request;
    call->context_.set_deadline(ToChrono(deadline));
    stub->async()->Generate(&call->context_, &call->request_, call.get());
    call->StartRead(&call->response_);
    call->StartCall();
    return call;
  }

  // The context outlives the call (it is a member), so this is safe after OnDone.
  void Cancel() override { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    observer_->OnResponse(response_);
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    std::shared_ptr<GrpcGenerateCall> self = std::move(self_);
    std::shared_ptr<GenerateObserver> observer = std::move(observer_);
    observer->OnDone(FromGrpcStatus(status));
  }

 private:
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  std::shared_ptr<GenerateObserver> observer_;
  std::shared_ptr<GrpcGenerateCall> self_;
};

class GrpcWorkerClient final : public WorkerClient {
 public:
  GrpcWorkerClient(const std::string& endpoint, const GrpcSecurity& security)
      : stub_(v1::Worker::NewStub(MakeChannel(endpoint, security, ClientChannelArgs()))) {}

  std::shared_ptr<GenerateCall> Generate(const v1::GenerateRequest& request, absl::Time deadline,
                                         std::shared_ptr<GenerateObserver> observer) override {
    return GrpcGenerateCall::Start(stub_.get(), request, deadline, std::move(observer));
  }

  void Status(absl::Time deadline, StatusCallback done) override {
    struct Probe {
      grpc::ClientContext context;
      v1::WorkerStatusRequest request;
      v1::WorkerStatusReply reply;
    };
    auto probe = std::make_shared<Probe>();
    probe->context.set_deadline(ToChrono(deadline));
    stub_->async()->Status(&probe->context, &probe->request, &probe->reply,
                           [probe, done = std::move(done)](grpc::Status s) {
                             if (!s.ok()) {
                               done(FromGrpcStatus(s));
                             } else {
                               done(std::move(probe->reply));
                             }
                           });
  }

  void SetStepPlan(const v1::StepPlanRequest& plan, absl::Time deadline,
                   StepPlanCallback done) override {
    struct Call {
      grpc::ClientContext context;
      v1::StepPlanRequest request;
      v1::StepPlanReply reply;
    };
    auto call = std::make_shared<Call>();
    call->context.set_deadline(ToChrono(deadline));
    call->request = plan;
    stub_->async()->SetStepPlan(&call->context, &call->request, &call->reply,
                                [call, done = std::move(done)](grpc::Status s) {
                                  if (!s.ok()) {
                                    done(FromGrpcStatus(s));
                                  } else {
                                    done(std::move(call->reply));
                                  }
                                });
  }

 private:
  std::unique_ptr<v1::Worker::Stub> stub_;
};

}  // namespace

std::shared_ptr<WorkerClient> MakeGrpcWorkerClient(const std::string& endpoint,
                                                   const GrpcSecurity& security) {
  return std::make_shared<GrpcWorkerClient>(endpoint, security);
}

std::shared_ptr<WorkerClient> GrpcWorkerClientFactory::Connect(const std::string& endpoint) {
  absl::MutexLock lock(&mu_);
  auto& client = clients_[endpoint];
  if (!client) client = MakeGrpcWorkerClient(endpoint, security_);
  return client;
}

}  // namespace joule::cluster
