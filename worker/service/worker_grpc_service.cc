#include "worker/service/worker_grpc_service.h"

#include <memory>
#include <optional>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/service/convert.h"
#include "worker/service/grpc_status.h"

namespace joule::worker {
namespace {

// Filled by the step loop, drained by the gRPC thread.
struct Mailbox {
  absl::Mutex mu;
  std::vector<int32_t> tokens ABSL_GUARDED_BY(mu);
  std::optional<RequestOutcome> outcome ABSL_GUARDED_BY(mu);
};

// How often a waiting Generate looks at whether its client went away.
constexpr absl::Duration kCancelPoll = absl::Milliseconds(20);

}  // namespace

grpc::Status WorkerGrpcService::Generate(grpc::ServerContext* context,
                                         const v1::GenerateRequest* request,
                                         grpc::ServerWriter<v1::GenerateResponse>* writer) {
  absl::StatusOr<GenerationRequest> converted = ToGenerationRequest(*request);
  if (!converted.ok()) return ToGrpc(converted.status());
  const std::string& request_id = request->request_id();

  auto mailbox = std::make_shared<Mailbox>();
  RequestCallbacks callbacks{
      .on_tokens =
          [mailbox](const std::vector<int32_t>& tokens) {
            absl::MutexLock lock(&mailbox->mu);
            mailbox->tokens.insert(mailbox->tokens.end(), tokens.begin(), tokens.end());
          },
      .on_done =
          [mailbox](const RequestOutcome& outcome) {
            absl::MutexLock lock(&mailbox->mu);
            mailbox->outcome = outcome;
          },
  };
  if (absl::Status s = handler_->Submit(request_id, *std::move(converted), std::move(callbacks));
      !s.ok()) {
    return ToGrpc(s);
  }
  const int rank = handler_->Status().rank;

  bool cancel_sent = false;
  auto cancel = [&] {
    if (!cancel_sent) handler_->Cancel(request_id);
    cancel_sent = true;
  };
  while (true) {
    std::vector<int32_t> tokens;
    std::optional<RequestOutcome> outcome;
    {
      absl::MutexLock lock(&mailbox->mu);
      auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mailbox->mu) {
        return !mailbox->tokens.empty() || mailbox->outcome.has_value();
      };
      mailbox->mu.AwaitWithTimeout(absl::Condition(&ready), kCancelPoll);
      tokens.swap(mailbox->tokens);
      outcome = mailbox->outcome;
    }
    if (context->IsCancelled()) {
      // The client is gone: free the sequence. Its on_done may still come;
      // the mailbox outlives this call.
      cancel();
      return grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled the request");
    }
    if (tokens.empty() && !outcome) continue;
    if (outcome && !outcome->status.ok()) {
      // Tokens already produced are delivered before the error.
      if (!tokens.empty()) {
        v1::GenerateResponse partial;
        partial.set_request_id(request_id);
        partial.set_rank(rank);
        partial.mutable_token_ids()->Add(tokens.begin(), tokens.end());
        writer->Write(partial);
      }
      return ToGrpc(outcome->status);
    }
    v1::GenerateResponse response;
    response.set_request_id(request_id);
    response.set_rank(rank);
    response.mutable_token_ids()->Add(tokens.begin(), tokens.end());
    if (outcome) {
      response.set_finish_reason(ToProto(outcome->finish));
      response.set_prompt_tokens(outcome->prompt_tokens);
      response.set_completion_tokens(outcome->completion_tokens);
    }
    if (!writer->Write(response)) {
      cancel();
      return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    }
    if (outcome) return grpc::Status::OK;
  }
}

grpc::Status WorkerGrpcService::Cancel(grpc::ServerContext* context,
                                       const v1::CancelRequest* request, v1::CancelReply* reply) {
  reply->set_found(handler_->Cancel(request->request_id()));
  return grpc::Status::OK;
}

grpc::Status WorkerGrpcService::Status(grpc::ServerContext* context,
                                       const v1::WorkerStatusRequest* request,
                                       v1::WorkerStatusReply* reply) {
  const WorkerStatus s = handler_->Status();
  reply->set_rank(s.rank);
  reply->set_ready(s.ready);
  reply->set_running(s.running);
  reply->set_waiting(s.waiting);
  reply->set_kv_free_blocks(s.kv_free_blocks);
  reply->set_kv_total_blocks(s.kv_total_blocks);
  reply->set_resident_bytes(s.resident_bytes);
  reply->set_loaded_weight_bytes(s.loaded_weight_bytes);
  reply->set_steps(s.steps);
  return grpc::Status::OK;
}

}  // namespace joule::worker
