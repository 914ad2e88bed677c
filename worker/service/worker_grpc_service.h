// The thin gRPC adapter of the Worker service (generate.proto) over a
// WorkerHandler: it translates messages and streams, nothing else.
//
// Generate runs on a gRPC thread: it submits the request, then waits on a
// per-call mailbox that the step loop fills (tokens, then the outcome), writing
// whatever has arrived as one message. A client that goes away (cancelled
// call, failed write, passed deadline) cancels the request, freeing its KV.
#pragma once

#include "grpcpp/grpcpp.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "worker/service/worker_handler.h"

namespace joule::worker {

class WorkerGrpcService final : public v1::Worker::Service {
 public:
  // Not owned.
  explicit WorkerGrpcService(WorkerHandler* handler) : handler_(handler) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Cancel(grpc::ServerContext* context, const v1::CancelRequest* request,
                      v1::CancelReply* reply) override;
  grpc::Status Status(grpc::ServerContext* context, const v1::WorkerStatusRequest* request,
                      v1::WorkerStatusReply* reply) override;

 private:
  WorkerHandler* const handler_;
};

}  // namespace joule::worker
