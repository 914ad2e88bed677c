#include "coordinator/cluster/router.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "scheduler/tier.h"

namespace joule::cluster {
// What the router keeps of one request while it is in flight.
struct Router::Call {
  uint64_t seq = 0;
  std::string request_id;
  int rank = 0;
  std::shared_ptr<GenerateSink> sink;
  std::function<void(absl::Status)> done;
  std::shared_ptr<WorkerClient> client;
  // Async callers hear OK for a client cancellation (they know); the blocking
  // Generate keeps answering CANCELLED.
  bool cancel_is_ok = false;

  // Guarded by Router::mu_.
  std::shared_ptr<GenerateCall> worker_call;
  absl::Status abort;             // set once: why the coordinator ended it
  bool client_cancelled = false;  // the client went away

  // Touched only from the observer's callbacks, which come one at a time.
  bool finished = false;      // a response carried a finish reason
  bool write_failed = false;  // the sink refused a write: drop the rest
};

// The worker call's observer: forwards to the router, keeps the Call alive.
class Router::Relay final : public GenerateObserver {
 public:
  Relay(Router* router, std::shared_ptr<Call> call) : router_(router), call_(std::move(call)) {}
  void OnResponse(const v1::GenerateResponse& response) override {
    router_->OnWorkerResponse(call_, response);
  }
  void OnDone(absl::Status status) override { router_->OnWorkerDone(call_, status); }

 private:
  Router* const router_;
  const std::shared_ptr<Call> call_;
};

Router::Router(Membership* membership, WorkerClientFactory* clients, RouterOptions options)
    : membership_(membership), clients_(clients), options_(options) {}

Router::~Router() {
  Shutdown();
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int* n) { return *n == 0; }, &outstanding_));
}

absl::Status Router::Validate(const v1::GenerateRequest& request) const {
  const ModelSummary& model = membership_->model();
  if (request.prompt_token_ids().empty()) {
    return absl::InvalidArgumentError("prompt_token_ids: must not be empty");
  }
  for (int i = 0; i < request.prompt_token_ids_size(); ++i) {
    const int32_t id = request.prompt_token_ids(i);
    if (id < 0 || id >= model.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt_token_ids[", i, "]: token id ", id,
                                                     " is outside the vocabulary [0, ",
                                                     model.vocab_size, ")"));
    }
  }
  const v1::SamplingParams& s = request.sampling();
  if (s.max_tokens() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.max_tokens: must be positive, got ", s.max_tokens()));
  }
  const int64_t total = static_cast<int64_t>(request.prompt_token_ids_size()) + s.max_tokens();
  if (total > model.max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling.max_tokens: the prompt (", request.prompt_token_ids_size(), " tokens) plus ",
        s.max_tokens(), " output tokens exceed the model's context of ", model.max_context,
        " tokens"));
  }
  if (!std::isfinite(s.temperature()) || s.temperature() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature: must be >= 0 (0 is greedy), got ", s.temperature()));
  }
  if (!std::isfinite(s.top_p()) || s.top_p() < 0 || s.top_p() > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p: must be in (0, 1] (0 means 1), got ", s.top_p()));
  }
  if (s.top_k() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_k: must be >= 0 (0 disables it), got ", s.top_k()));
  }
  for (int i = 0; i < s.stop_token_ids_size(); ++i) {
    const int32_t id = s.stop_token_ids(i);
    if (id < 0 || id >= model.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop_token_ids[", i, "]: token id ",
                                                     id, " is outside the vocabulary [0, ",
                                                     model.vocab_size, ")"));
    }
  }
  auto tier = scheduler::ParseServiceTier(request.service_tier());
  if (!tier.ok()) return tier.status();
  return absl::OkStatus();
}

std::string Router::DeadRanksSummary() const {
  std::string out;
  for (const RankInfo& r : membership_->Ranks()) {
    if (r.state != RankState::kDead) continue;
    absl::StrAppend(&out, out.empty() ? "" : "; ", "rank ", r.rank, " died: ", r.dead_reason);
  }
  return out;
}

absl::StatusOr<int> Router::PickRank() const {
  const std::vector<RankInfo> ranks = membership_->Ranks();
  int registered = 0, ready = 0;
  for (const RankInfo& r : ranks) {
    if (r.state == RankState::kDead) {
      // One missing rank stalls every step of the others: refuse rather than hang.
      return absl::UnavailableError(
          absl::StrCat("rank ", r.rank, " died: ", r.dead_reason,
                       "; the expert-parallel group cannot serve until it is back"));
    }
    registered += r.state != RankState::kFree;
    ready += r.state == RankState::kReady;
  }
  const int n = static_cast<int>(ranks.size());
  if (ready == 0 || registered < n) {
    return absl::UnavailableError(absl::StrCat("no worker is ready (", registered, " of ", n,
                                               " ranks registered, ", ready, " ready)"));
  }
  absl::MutexLock lock(&mu_);
  std::vector<int> in_flight = in_flight_;
  in_flight.resize(n, 0);
  int best = -1;
  int best_load = 0;
  for (const RankInfo& r : ranks) {
    if (r.state != RankState::kReady) continue;
    const int load = std::max(in_flight[r.rank], r.running + r.waiting);
    if (best < 0 || load < best_load ||
        (load == best_load && r.kv_usage < ranks[best].kv_usage)) {
      best = r.rank;
      best_load = load;
    }
  }
  return best;
}

void Router::GenerateAsync(const v1::GenerateRequest& request, absl::Time client_deadline,
                           std::shared_ptr<GenerateSink> sink,
                           std::function<void(absl::Status)> done) {
  Start(request, client_deadline, std::move(sink), std::move(done), /*cancel_is_ok=*/true);
}

void Router::GenerateAsyncOnRank(int rank, const v1::GenerateRequest& request,
                                 absl::Time client_deadline, std::shared_ptr<GenerateSink> sink,
                                 std::function<void(absl::Status)> done) {
  Start(request, client_deadline, std::move(sink), std::move(done), /*cancel_is_ok=*/true, rank);
}

std::shared_ptr<Router::Call> Router::Start(const v1::GenerateRequest& request,
                                            absl::Time client_deadline,
                                            std::shared_ptr<GenerateSink> sink,
                                            std::function<void(absl::Status)> done,
                                            bool cancel_is_ok, std::optional<int> forced_rank) {
  if (absl::Status s = Validate(request); !s.ok()) {
    done(std::move(s));
    return nullptr;
  }
  absl::StatusOr<int> rank = PickRank();
  if (!rank.ok()) {
    done(rank.status());
    return nullptr;
  }
  const std::vector<RankInfo> ranks = membership_->Ranks();
  if (forced_rank.has_value()) {
    if (*forced_rank < 0 || *forced_rank >= static_cast<int>(ranks.size()) ||
        ranks[*forced_rank].state != RankState::kReady) {
      done(absl::UnavailableError(absl::StrCat("rank ", *forced_rank, " is not ready")));
      return nullptr;
    }
    rank = *forced_rank;
  }
  const std::string endpoint = ranks[*rank].worker_endpoint;

  v1::GenerateRequest forward = request;
  // Workers get our tier names (scheduler/tier.h), whatever the client spelled.
  forward.set_service_tier(std::string(
      scheduler::TierName(scheduler::ParseServiceTier(request.service_tier()).value())));
  if (forward.sampling().top_p() == 0) forward.mutable_sampling()->set_top_p(1.0f);

  auto call = std::make_shared<Call>();
  call->rank = *rank;
  call->sink = std::move(sink);
  call->done = std::move(done);
  call->cancel_is_ok = cancel_is_ok;
  call->client = clients_->Connect(endpoint);
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) {
      refused = absl::UnavailableError("coordinator is shutting down");
    } else if (!request.request_id().empty() && by_id_.count(request.request_id()) > 0) {
      refused = absl::AlreadyExistsError(absl::StrCat(
          "request_id: '", request.request_id(), "' is already in flight; ids must be unique"));
    } else {
      call->seq = next_call_++;
      if (request.request_id().empty()) forward.set_request_id(absl::StrCat("req-", call->seq));
      call->request_id = forward.request_id();
      calls_[call->seq] = call;
      by_id_[call->request_id] = call->seq;
      if (in_flight_.size() <= static_cast<size_t>(call->rank)) in_flight_.resize(call->rank + 1);
      ++in_flight_[call->rank];
      ++outstanding_;
    }
  }
  if (!refused.ok()) {
    call->done(std::move(refused));
    return nullptr;
  }
  JOULE_LOG(Debug) << "request " << call->request_id << " -> rank " << call->rank << " ("
                   << endpoint << ")";

  const absl::Time deadline = std::min(client_deadline, absl::Now() + options_.request_timeout);
  std::shared_ptr<GenerateCall> worker_call =
      call->client->Generate(forward, deadline, std::make_shared<Relay>(this, call));
  bool cancel_now;
  {
    absl::MutexLock lock(&mu_);
    call->worker_call = worker_call;
    // An abort or a client cancellation may have come before the call existed.
    cancel_now = !call->abort.ok() || call->client_cancelled;
  }
  if (cancel_now) worker_call->Cancel();
  return call;
}

void Router::OnWorkerResponse(const std::shared_ptr<Call>& call,
                              const v1::GenerateResponse& response) {
  if (call->write_failed) return;  // drain until the cancellation lands
  v1::GenerateResponse out = response;
  out.set_request_id(call->request_id);
  out.set_rank(call->rank);
  call->finished = call->finished || out.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
  if (!call->sink->Write(out)) {
    call->write_failed = true;
    CancelByClient(call);
  }
}

void Router::CancelByClient(const std::shared_ptr<Call>& call) {
  std::shared_ptr<GenerateCall> worker_call;
  {
    absl::MutexLock lock(&mu_);
    if (call->client_cancelled) return;
    call->client_cancelled = true;
    worker_call = call->worker_call;
  }
  JOULE_LOG(Debug) << "request " << call->request_id << ": client gone, cancelling on rank "
                   << call->rank;
  // Null while Start has not stored it yet; Start then cancels.
  if (worker_call != nullptr) worker_call->Cancel();
}

void Router::OnWorkerDone(const std::shared_ptr<Call>& call, const absl::Status& worker_status) {
  {
    absl::MutexLock lock(&mu_);
    calls_.erase(call->seq);
    by_id_.erase(call->request_id);
    --in_flight_[call->rank];
  }
  if (std::optional<absl::Status> outcome = Outcome(*call, worker_status)) {
    Complete(call, *std::move(outcome));
    return;
  }
  // Did the request fail, or is the worker gone? Ask it directly, without
  // holding this (gRPC) thread while the probe waits.
  call->client->Status(absl::Now() + options_.probe_timeout,
                       [this, call, worker_status](absl::StatusOr<v1::WorkerStatusReply> probe) {
                         Complete(call, ProbedOutcome(*call, worker_status, probe));
                       });
}

void Router::Complete(const std::shared_ptr<Call>& call, absl::Status outcome) {
  if (absl::IsCancelled(outcome) && call->cancel_is_ok) {
    outcome = absl::OkStatus();
  } else if (!outcome.ok() && !absl::IsCancelled(outcome)) {
    JOULE_LOG(Info) << "request " << call->request_id << " on rank " << call->rank << ": "
                    << outcome;
  }
  call->done(std::move(outcome));
  call->done = nullptr;  // what it captured (the client's connection) can go now
  Released();
}

void Router::Released() {
  absl::MutexLock lock(&mu_);
  --outstanding_;
}

void Router::Cancel(const std::string& request_id) {
  std::shared_ptr<Call> call;
  {
    absl::MutexLock lock(&mu_);
    auto it = by_id_.find(request_id);
    if (it == by_id_.end()) return;
    call = calls_.at(it->second);
  }
  CancelByClient(call);
}

absl::Status Router::Generate(const v1::GenerateRequest& request, absl::Time client_deadline,
                              GenerateSink* sink) {
  // Collects what the worker call delivers on gRPC's threads; this thread
  // writes it to the client, so a slow client never holds a gRPC thread.
  class Mailbox final : public GenerateSink {
   public:
    explicit Mailbox(GenerateSink* client) : client_(client) {}
    bool Write(const v1::GenerateResponse& response) override {
      absl::MutexLock lock(&mu_);
      if (gone_) return false;
      queue_.push_back(response);
      return true;
    }
    bool ClientGone() const override {
      {
        absl::MutexLock lock(&mu_);
        if (gone_) return true;
      }
      return client_->ClientGone();
    }
    void SetGone() {
      absl::MutexLock lock(&mu_);
      gone_ = true;
      queue_.clear();
    }
    void SetOutcome(absl::Status s) {
      absl::MutexLock lock(&mu_);
      outcome_ = std::move(s);
    }
    // The next response, or the outcome once everything was taken.
    std::optional<v1::GenerateResponse> Next(absl::Status* outcome) {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !queue_.empty() || outcome_.has_value();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) {
        *outcome = *outcome_;
        return std::nullopt;
      }
      v1::GenerateResponse r = std::move(queue_.front());
      queue_.pop_front();
      return r;
    }

   private:
    GenerateSink* const client_;
    mutable absl::Mutex mu_;
    std::deque<v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
    std::optional<absl::Status> outcome_ ABSL_GUARDED_BY(mu_);
    bool gone_ ABSL_GUARDED_BY(mu_) = false;
  };

  auto mailbox = std::make_shared<Mailbox>(sink);
  std::shared_ptr<Call> call = Start(request, client_deadline, mailbox,
                                     [mailbox](absl::Status s) { mailbox->SetOutcome(s); },
                                     /*cancel_is_ok=*/false);
  absl::Status outcome;
  bool gone = false;
  while (std::optional<v1::GenerateResponse> response = mailbox->Next(&outcome)) {
    if (gone || sink->Write(*response)) continue;
    gone = true;
    mailbox->SetGone();
    if (call != nullptr) CancelByClient(call);
  }
  return outcome;
}

std::optional<absl::Status> Router::Outcome(const Call& call,
                                            const absl::Status& worker_status) const {
  {
    absl::MutexLock lock(&mu_);
    if (!call.abort.ok()) return call.abort;
    if (call.client_cancelled) {
      return absl::CancelledError(
          "the client cancelled the request; the worker was told to drop it");
    }
  }
  if (worker_status.ok()) {
    if (!call.finished) {
      return absl::UnavailableError(absl::StrCat(
          "rank ", call.rank, " ended the stream of request ", call.request_id,
          " without a finish reason"));
    }
    return absl::OkStatus();
  }
  const std::string msg(worker_status.message());
  switch (worker_status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAlreadyExists:
      // The request's own fault (or a full worker): keep the code.
      return absl::Status(worker_status.code(), absl::StrCat("rank ", call.rank, ": ", msg));
    case absl::StatusCode::kDeadlineExceeded:
      return absl::DeadlineExceededError(absl::StrCat(
          "request ", call.request_id, " did not finish on rank ", call.rank,
          " before its deadline (the client's, or --request-timeout-s): ", msg));
    default:
      return std::nullopt;  // ask the worker
  }
}

absl::Status Router::ProbedOutcome(const Call& call, const absl::Status& worker_status,
                                   const absl::StatusOr<v1::WorkerStatusReply>& probe) {
  const std::string msg(worker_status.message());
  if (!probe.ok() && probe.status().code() != absl::StatusCode::kUnimplemented) {
    std::string reason = absl::StrCat("worker unreachable: ", probe.status().message());
    if (probe.status().message() != worker_status.message()) {
      absl::StrAppend(&reason, " (its Generate stream ended with ",
                      absl::StatusCodeToString(worker_status.code()), ": ", msg, ")");
    }
    if (membership_->MarkDead(call.rank, reason)) FailRank(call.rank, reason);
    return absl::UnavailableError(absl::StrCat("rank ", call.rank, " died: ", reason));
  }
  // Everything else is the cluster's failure, typically a step that could not
  // complete because an expert-parallel peer is gone: retryable, with the reason.
  const std::string dead = DeadRanksSummary();
  return absl::UnavailableError(absl::StrCat("rank ", call.rank, " failed request ",
                                             call.request_id, dead.empty() ? "" : " (",
                                             dead, dead.empty() ? "" : ")", ": ",
                                             absl::StatusCodeToString(worker_status.code()), ": ",
                                             msg));
}

void Router::Poll() {
  for (const DeadRank& d : membership_->ExpireHeartbeats()) FailRank(d.rank, d.reason);
  // ClientGone() belongs to the front door and may take its locks: ask
  // outside ours.
  std::vector<std::shared_ptr<Call>> live;
  {
    absl::MutexLock lock(&mu_);
    live.reserve(calls_.size());
    for (const auto& [seq, call] : calls_) {
      if (!call->client_cancelled) live.push_back(call);
    }
  }
  for (const std::shared_ptr<Call>& call : live) {
    if (call->sink->ClientGone()) CancelByClient(call);
  }
}

void Router::FailRank(int rank, const std::string& reason) {
  std::vector<std::shared_ptr<GenerateCall>> to_cancel;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [seq, call] : calls_) {
      if (call->rank != rank || !call->abort.ok()) continue;
      call->abort = absl::UnavailableError(absl::StrCat("rank ", rank, " died: ", reason));
      if (call->worker_call != nullptr) to_cancel.push_back(call->worker_call);
    }
  }
  // Outside the lock: a cancelled call may report OnDone on this thread.
  for (const auto& c : to_cancel) c->Cancel();
}

void Router::Shutdown() {
  std::vector<std::shared_ptr<GenerateCall>> to_cancel;
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
    for (auto& [seq, call] : calls_) {
      if (!call->abort.ok()) continue;
      call->abort = absl::UnavailableError("coordinator is shutting down");
      if (call->worker_call != nullptr) to_cancel.push_back(call->worker_call);
    }
  }
  for (const auto& c : to_cancel) c->Cancel();
}

int Router::InFlight(int rank) const {
  absl::MutexLock lock(&mu_);
  return rank >= 0 && static_cast<size_t>(rank) < in_flight_.size() ? in_flight_[rank] : 0;
}

}  // namespace joule::cluster
