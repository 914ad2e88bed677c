#include "coordinator/cluster/grpc_worker_client.h"

#include <grpcpp/grpcpp.h>

#include "coordinator/cluster/grpc_util.h"
#include "proto/joule/v1/generate.grpc.pb.h"

namespace joule::cluster {
namespace {

class GrpcGenerateStream final : public GenerateStream {
 public:
  GrpcGenerateStream(v1::Worker::Stub* stub, const v1::GenerateRequest& request,
                     absl::Time deadline) {
    context_.set_deadline(ToChrono(deadline));
    reader_ = stub->Generate(&context_, request);
  }
  ~GrpcGenerateStream() override {
    if (finished_) return;
    // Abandoned mid-stream: cancel and collect the status so nothing leaks.
    context_.TryCancel();
    v1::GenerateResponse ignored;
    while (reader_->Read(&ignored)) {
    }
    reader_->Finish();
  }
  bool Read(v1::GenerateResponse* response) override { return reader_->Read(response); }
  void Cancel() override { context_.TryCancel(); }
  absl::Status Finish() override {
    finished_ = true;
    return FromGrpcStatus(reader_->Finish());
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader_;
  bool finished_ = false;
};

class GrpcWorkerClient final : public WorkerClient {
 public:
  explicit GrpcWorkerClient(const std::string& endpoint)
      : stub_(v1::Worker::NewStub(grpc::CreateCustomChannel(
            endpoint, grpc::InsecureChannelCredentials(), ClientChannelArgs()))) {}

  std::unique_ptr<GenerateStream> Generate(const v1::GenerateRequest& request,
                                           absl::Time deadline) override {
    return std::make_unique<GrpcGenerateStream>(stub_.get(), request, deadline);
  }

  absl::StatusOr<v1::WorkerStatusReply> Status(absl::Time deadline) override {
    grpc::ClientContext context;
    context.set_deadline(ToChrono(deadline));
    v1::WorkerStatusReply reply;
    grpc::Status s = stub_->Status(&context, v1::WorkerStatusRequest(), &reply);
    if (!s.ok()) return FromGrpcStatus(s);
    return reply;
  }

 private:
  std::unique_ptr<v1::Worker::Stub> stub_;
};

}  // namespace

std::shared_ptr<WorkerClient> MakeGrpcWorkerClient(const std::string& endpoint) {
  return std::make_shared<GrpcWorkerClient>(endpoint);
}

std::shared_ptr<WorkerClient> GrpcWorkerClientFactory::Connect(const std::string& endpoint) {
  absl::MutexLock lock(&mu_);
  auto& client = clients_[endpoint];
  if (!client) client = MakeGrpcWorkerClient(endpoint);
  return client;
}

}  // namespace joule::cluster
