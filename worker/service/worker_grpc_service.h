// The thin gRPC adapter of the Worker service (generate.proto) over a
// WorkerHandler: it translates messages and streams, nothing else.
//
// Callback API: a Generate stream holds no server thread. The step loop's
// callbacks (tokens, then the outcome) queue onto the call and start a write
// when none is in flight; whatever arrived meanwhile goes as one message. A
// client that goes away (cancelled call, failed write, passed deadline:
// OnCancel) cancels the request, freeing its KV blocks.
#pragma once

#include "grpcpp/grpcpp.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "worker/service/worker_handler.h"

namespace joule::worker {

class WorkerGrpcService final : public v1::Worker::CallbackService {
 public:
  // Not owned.
  explicit WorkerGrpcService(WorkerHandler* handler) : handler_(handler) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const v1::CancelRequest* request,
                                   v1::CancelReply* reply) override;
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context,
                                   const v1::WorkerStatusRequest* request,
                                   v1::WorkerStatusReply* reply) override;

 private:
  WorkerHandler* const handler_;
};

}  // namespace joule::worker
