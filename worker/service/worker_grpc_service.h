// The thin gRPC adapter of the Worker service (generate.proto) over a
// WorkerHandler: it translates messages and streams, nothing else.
//
// Callback API: a Generate stream holds no server thread. The step loop's
// callbacks (tokens, then the outcome) queue onto the call and start a write
// when none is in flight; whatever arrived meanwhile goes as one message. A
// client that goes away (cancelled call, failed write, passed deadline:
// OnCancel) cancels the request, freeing its KV blocks. Cancel is answered
// only for the connection that submitted the request: NOT_FOUND for an id
// that is not running, PERMISSION_DENIED for another caller's. SetStepPlan
// (the coordinator's scheduler) needs only the cluster token: preempting or
// reordering someone's request changes when its tokens come, not what they are.
#pragma once

#include <memory>

#include "common/grpc_security.h"
#include "grpcpp/grpcpp.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "worker/service/request_owners.h"
#include "worker/service/worker_handler.h"

namespace joule::worker {

class WorkerGrpcService final : public v1::Worker::CallbackService {
 public:
  // `handler` is not owned. Every method refuses calls without `token`
  // (none: every call is accepted).
  explicit WorkerGrpcService(WorkerHandler* handler, ClusterToken token = {})
      : handler_(handler), token_(std::move(token)), owners_(std::make_shared<RequestOwners>()) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const v1::CancelRequest* request,
                                   v1::CancelReply* reply) override;
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context,
                                   const v1::WorkerStatusRequest* request,
                                   v1::WorkerStatusReply* reply) override;
  // Answered once the step loop has applied the plan (or at once when stale).
  grpc::ServerUnaryReactor* SetStepPlan(grpc::CallbackServerContext* context,
                                        const v1::StepPlanRequest* request,
                                        v1::StepPlanReply* reply) override;

 private:
  WorkerHandler* const handler_;
  const ClusterToken token_;
  // Who submitted each live request (Cancel is refused to others); shared
  // with the streams, which may outlive a call into the service.
  const std::shared_ptr<RequestOwners> owners_;
};

}  // namespace joule::worker
