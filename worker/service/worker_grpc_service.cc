#include "worker/service/worker_grpc_service.h"

#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "worker/service/convert.h"
#include "worker/service/grpc_status.h"

namespace joule::worker {
namespace {

// One Generate stream. Shared by gRPC (until OnDone) and the step loop's
// callbacks (until on_done), whichever lets go last frees it. Every decision
// is taken under mu_ and every gRPC operation is started outside it, so a
// callback that gRPC runs inline cannot deadlock on it.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse>,
                              public std::enable_shared_from_this<GenerateReactor> {
 public:
  GenerateReactor(WorkerHandler* handler, std::shared_ptr<RequestOwners> owners, std::string request_id)
      : handler_(handler), owners_(std::move(owners)), request_id_(std::move(request_id)) {}

  // gRPC holds a raw pointer until OnDone: keep us alive until then.
  void Hold() { self_ = shared_from_this(); }

  // The id is claimed for this caller (RequestOwners::Claim); it is released
  // when the request ends.
  void Start(GenerationRequest request) {
    RequestCallbacks callbacks{
        .on_tokens =
            [self = self_](const TokenUpdate& update) {
              {
                absl::MutexLock lock(&self->mu_);
                self->tokens_.insert(self->tokens_.end(), update.tokens.begin(), update.tokens.end());
                self->logprobs_.insert(self->logprobs_.end(), update.logprobs.begin(),
                                       update.logprobs.end());
                self->prompt_logprobs_.insert(self->prompt_logprobs_.end(),
                                              update.prompt_logprobs.begin(),
                                              update.prompt_logprobs.end());
              }
              self->Pump();
            },
        .on_done =
            [self = self_](const RequestOutcome& outcome) {
              self->owners_->Release(self->request_id_);
              {
                absl::MutexLock lock(&self->mu_);
                self->outcome_ = outcome;
              }
              self->Pump();
            },
    };
    if (absl::Status s = handler_->Submit(request_id_, std::move(request), std::move(callbacks));
        !s.ok()) {
      owners_->Release(request_id_);
      FinishWith(ToGrpc(s));
      return;
    }
    const int rank = handler_->Status().rank;
    {
      absl::MutexLock lock(&mu_);
      rank_ = rank;
    }
    Pump();
  }

  void FinishWith(grpc::Status status) {
    {
      absl::MutexLock lock(&mu_);
      if (finish_called_) return;
      finish_called_ = true;
    }
    Finish(std::move(status));
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      if (!ok) client_gone_ = true;
    }
    if (!ok) CancelRequest();
    Pump();
  }

  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      client_gone_ = true;
    }
    CancelRequest();
    Pump();
  }

  void OnDone() override {
    // gRPC is done with us; the step loop's callbacks may still hold a reference.
    std::shared_ptr<GenerateReactor> self = std::move(self_);
  }

 private:
  // The client is gone: free the sequence (its on_done may still come).
  void CancelRequest() {
    {
      absl::MutexLock lock(&mu_);
      if (cancel_sent_ || outcome_.has_value()) return;
      cancel_sent_ = true;
    }
    handler_->Cancel(request_id_);
  }

  // Starts the next write, or the finish, if one is due and none is in flight.
  void Pump() {
    enum class Action { kNone, kWrite, kWriteAndFinish, kFinish } action = Action::kNone;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (finish_called_ || write_in_flight_ || rank_ < 0) return;
      if (client_gone_) {
        action = Action::kFinish;
        status = grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled the request");
      } else if (outcome_.has_value() || !tokens_.empty()) {
        response_.Clear();
        response_.set_request_id(request_id_);
        response_.set_rank(rank_);
        response_.mutable_token_ids()->Add(tokens_.begin(), tokens_.end());
        tokens_.clear();
        TakeLogprobs();
        if (!outcome_.has_value()) {
          action = Action::kWrite;
        } else if (!outcome_->status.ok()) {
          // Tokens already produced are delivered before the error.
          status = ToGrpc(outcome_->status);
          action = response_.token_ids_size() > 0 ? Action::kWriteAndFinish : Action::kFinish;
        } else {
          response_.set_finish_reason(ToProto(outcome_->finish));
          response_.set_prompt_tokens(outcome_->prompt_tokens);
          response_.set_completion_tokens(outcome_->completion_tokens);
          response_.set_resumed_tokens(outcome_->resumed_tokens);
          response_.set_cached_tokens(outcome_->cached_tokens);
          response_.set_energy_joules(outcome_->energy_joules);
          response_.set_energy_source(outcome_->energy_source);
          action = Action::kWriteAndFinish;
        }
      }
      write_in_flight_ = action == Action::kWrite;
      finish_called_ = action == Action::kWriteAndFinish || action == Action::kFinish;
    }
    switch (action) {
      case Action::kNone:
        break;
      case Action::kWrite:
        StartWrite(&response_);
        break;
      case Action::kWriteAndFinish:
        StartWriteAndFinish(&response_, grpc::WriteOptions(), status);
        break;
      case Action::kFinish:
        Finish(status);
        break;
    }
  }

  // Moves the pending logprob entries into response_.
  void TakeLogprobs() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const TokenLogprob& l : logprobs_) ToProto(l, response_.add_logprobs());
    for (const TokenLogprob& l : prompt_logprobs_) ToProto(l, response_.add_prompt_logprobs());
    logprobs_.clear();
    prompt_logprobs_.clear();
  }

  WorkerHandler* const handler_;
  const std::shared_ptr<RequestOwners> owners_;
  const std::string request_id_;
  std::shared_ptr<GenerateReactor> self_;  // gRPC's reference, dropped in OnDone

  absl::Mutex mu_;
  int rank_ ABSL_GUARDED_BY(mu_) = -1;  // set once submitted; no write before
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  std::vector<TokenLogprob> logprobs_ ABSL_GUARDED_BY(mu_);         // one per token in tokens_
  std::vector<TokenLogprob> prompt_logprobs_ ABSL_GUARDED_BY(mu_);  // until the first write
  std::optional<RequestOutcome> outcome_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse response_;  // the message in flight; written under mu_ only when none is
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
  bool cancel_sent_ ABSL_GUARDED_BY(mu_) = false;
};

// Who is calling: the connection the call came on (its peer address and
// port), which another client cannot share.
std::string CallerOf(const grpc::CallbackServerContext& context) { return context.peer(); }

// Ends a unary call at once with `status`.
grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* context, const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* WorkerGrpcService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto reactor = std::make_shared<GenerateReactor>(handler_, owners_, request->request_id());
  reactor->Hold();
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) {
    reactor->FinishWith(auth);
    return reactor.get();
  }
  absl::StatusOr<GenerationRequest> converted = ToGenerationRequest(*request);
  if (!converted.ok()) {
    reactor->FinishWith(ToGrpc(converted.status()));
  } else if (!owners_->Claim(request->request_id(), CallerOf(*context))) {
    reactor->FinishWith(grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                                     "request_id: a request with this id is already running"));
  } else {
    reactor->Start(*std::move(converted));
  }
  return reactor.get();
}

grpc::ServerUnaryReactor* WorkerGrpcService::Cancel(grpc::CallbackServerContext* context,
                                                    const v1::CancelRequest* request,
                                                    v1::CancelReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return Refuse(context, auth);
  // Only the caller that submitted a request may cancel it: request ids travel
  // in logs and responses, a connection's identity does not.
  switch (owners_->Check(request->request_id(), CallerOf(*context))) {
    case RequestOwners::Access::kUnknown:
      return Refuse(context, grpc::Status(grpc::StatusCode::NOT_FOUND, "request_id: no such request is running"));
    case RequestOwners::Access::kOther:
      return Refuse(context, grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                                          "request_id: the request was submitted by another caller"));
    case RequestOwners::Access::kOwner:
      break;
  }
  reply->set_found(handler_->Cancel(request->request_id()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerGrpcService::Status(grpc::CallbackServerContext* context,
                                                    const v1::WorkerStatusRequest* request,
                                                    v1::WorkerStatusReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return Refuse(context, auth);
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
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerGrpcService::SetStepPlan(grpc::CallbackServerContext* context,
                                                         const v1::StepPlanRequest* request,
                                                         v1::StepPlanReply* reply) {
  if (grpc::Status auth = token_.Check(*context); !auth.ok()) return Refuse(context, auth);
  if (request->sequence() == 0) {
    return Refuse(context, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                        "sequence: must be positive (plans are numbered from 1)"));
  }
  if (request->max_running() < 0) {
    return Refuse(context, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                        "max_running: must be >= 0 (0: the worker's own limit)"));
  }
  StepPlan plan{.sequence = request->sequence(),
                .order = {request->order().begin(), request->order().end()},
                .preempt = {request->preempt().begin(), request->preempt().end()},
                .max_running = request->max_running()};
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // `reply` lives until Finish; `done` may run on the step loop's thread.
  handler_->SetStepPlan(std::move(plan), [reactor, reply](absl::StatusOr<int> preempted) {
    if (!preempted.ok()) {
      reactor->Finish(ToGrpc(preempted.status()));
      return;
    }
    reply->set_preempted(*preempted);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

}  // namespace joule::worker
