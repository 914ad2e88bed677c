#include "coordinator/cluster/router.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/secrets.h"
#include "common/status.h"
#include "scheduler/tier.h"

namespace joule::cluster {
// What the router keeps of one request until it has its outcome.
struct Router::Call {
  uint64_t seq = 0;
  std::string request_id;  // the client's (or ours, when it gave none)
  // The id workers see: ours, 128 random bits, whatever the client chose, so
  // that nobody can name another's request on a worker.
  std::string worker_request_id;
  v1::GenerateRequest request;  // as sent to workers, without resumed tokens
  absl::Time deadline;          // the client's, capped by request_timeout
  std::shared_ptr<GenerateSink> sink;
  std::function<void(absl::Status)> done;
  // Async callers hear OK for a client cancellation (they know); the blocking
  // Generate keeps answering CANCELLED.
  bool cancel_is_ok = false;

  // Guarded by Router::mu_.
  int rank = -1;     // the current attempt's rank; -1 while parked
  int attempts = 0;  // attempts started
  std::shared_ptr<WorkerClient> client;
  std::shared_ptr<GenerateCall> worker_call;
  absl::Status abort;             // why the coordinator ended the current attempt
  bool client_cancelled = false;  // the client went away
  bool parked = false;            // waiting for a serving group
  absl::Time parked_at;
  std::string park_reason;        // the failure it waits to recover from

  // Touched by one attempt's callbacks (one at a time) and between attempts.
  bool finished = false;        // a response carried a finish reason
  bool write_failed = false;    // the sink refused a write: drop the rest
  std::vector<int32_t> tokens;  // relayed to the sink, over every attempt
  int resumed_tokens = 0;       // recomputed by attempts after the first
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

absl::StatusOr<std::vector<int>> Router::ServingRanks(const std::vector<RankInfo>& ranks) const {
  const GroupInfo group = membership_->group();
  std::vector<int> serving;
  if (group.epoch > 1) {
    // An elastic group re-formed after a death: its members serve, once all
    // of them run the new epoch.
    if (group.members.empty()) {
      return absl::UnavailableError(
          absl::StrCat("no rank is left in the expert-parallel group (", group.reason, ")"));
    }
    if (!group.serving) {
      return absl::UnavailableError(absl::StrCat("the expert-parallel group is re-forming (epoch ",
                                                 group.epoch, " after ", group.reason, ")"));
    }
    for (int r : group.members) {
      if (ranks[r].state == RankState::kReady) serving.push_back(r);
    }
    return serving;
  }
  int registered = 0;
  for (const RankInfo& r : ranks) {
    if (r.state == RankState::kDead) {
      // One missing rank stalls every step of the others: refuse rather than hang.
      return absl::UnavailableError(
          absl::StrCat("rank ", r.rank, " died: ", r.dead_reason,
                       "; the expert-parallel group cannot serve until it is back"));
    }
    registered += r.state != RankState::kFree;
    if (r.state == RankState::kReady) serving.push_back(r.rank);
  }
  const int n = static_cast<int>(ranks.size());
  if (serving.empty() || registered < n) {
    return absl::UnavailableError(absl::StrCat("no worker is ready (", registered, " of ", n,
                                               " ranks registered, ", serving.size(), " ready)"));
  }
  return serving;
}

absl::StatusOr<int> Router::PickRank() const {
  const std::vector<RankInfo> ranks = membership_->Ranks();
  ASSIGN_OR_RETURN(const std::vector<int> serving, ServingRanks(ranks));
  absl::MutexLock lock(&mu_);
  int best = -1;
  int best_load = 0;
  for (int rank : serving) {
    const RankInfo& r = ranks[rank];
    const int in_flight = static_cast<size_t>(rank) < in_flight_.size() ? in_flight_[rank] : 0;
    const int load = std::max(in_flight, r.running + r.waiting);
    if (best < 0 || load < best_load ||
        (load == best_load && r.kv_usage < ranks[best].kv_usage)) {
      best = rank;
      best_load = load;
    }
  }
  if (best < 0) return absl::UnavailableError("no rank of the expert-parallel group is ready");
  return best;
}

bool Router::Reforming() const {
  if (options_.max_resumes <= 0) return false;
  const GroupInfo group = membership_->group();
  return group.epoch > 1 && !group.members.empty() && !group.serving;
}

absl::Status Router::Ready() const {
  absl::Status s = PickRank().status();
  return s.ok() || Reforming() ? absl::OkStatus() : s;
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
  // While the group re-forms, a new request waits like a resumed one.
  const bool wait = !rank.ok() && Reforming();
  if (!rank.ok() && !wait) {
    done(rank.status());
    return nullptr;
  }
  if (rank.ok() && forced_rank.has_value()) {
    const std::vector<RankInfo> ranks = membership_->Ranks();
    if (*forced_rank < 0 || *forced_rank >= static_cast<int>(ranks.size()) ||
        ranks[*forced_rank].state != RankState::kReady) {
      done(absl::UnavailableError(absl::StrCat("rank ", *forced_rank, " is not ready")));
      return nullptr;
    }
    rank = *forced_rank;
  }

  auto call = std::make_shared<Call>();
  call->request = request;
  // Workers get our tier names (scheduler/tier.h), whatever the client spelled.
  call->request.set_service_tier(std::string(
      scheduler::TierName(scheduler::ParseServiceTier(request.service_tier()).value())));
  if (call->request.sampling().top_p() == 0) call->request.mutable_sampling()->set_top_p(1.0f);
  call->deadline = std::min(client_deadline, absl::Now() + options_.request_timeout);
  call->sink = std::move(sink);
  call->done = std::move(done);
  call->cancel_is_ok = cancel_is_ok;
  call->worker_request_id = NewRequestId("req");
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
      if (request.request_id().empty()) call->request.set_request_id(call->worker_request_id);
      call->request_id = call->request.request_id();
      calls_[call->seq] = call;
      by_id_[call->request_id] = call->seq;
      ++outstanding_;
      // Launch takes parked calls: a new one starts out parked.
      call->parked = true;
      call->parked_at = absl::Now();
      if (wait) call->park_reason = std::string(rank.status().message());
    }
  }
  if (!refused.ok()) {
    call->done(std::move(refused));
    return nullptr;
  }
  if (wait) {
    JOULE_LOG(Info) << "request " << call->request_id << " waits: " << call->park_reason;
  } else if (Claim(call)) {
    Launch(call, *rank);
  }
  return call;
}

bool Router::Claim(const std::shared_ptr<Call>& call) {
  absl::MutexLock lock(&mu_);
  if (!call->parked) return false;
  call->parked = false;
  return true;
}

void Router::Launch(const std::shared_ptr<Call>& call, int rank) {
  const std::vector<RankInfo> ranks = membership_->Ranks();
  const std::string endpoint = ranks[rank].worker_endpoint;
  v1::GenerateRequest forward = call->request;
  forward.set_request_id(call->worker_request_id);
  forward.mutable_resumed_token_ids()->Assign(call->tokens.begin(), call->tokens.end());
  std::shared_ptr<WorkerClient> client = clients_->Connect(endpoint);
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) {
      refused = absl::UnavailableError("coordinator is shutting down");
    } else {
      call->rank = rank;
      call->client = client;
      call->abort = absl::OkStatus();
      call->worker_call = nullptr;
      if (call->attempts++ > 0) {
        ++stats_.requests_resumed;
        stats_.resumed_tokens += call->tokens.size();
      }
      if (in_flight_.size() <= static_cast<size_t>(rank)) in_flight_.resize(rank + 1);
      ++in_flight_[rank];
    }
  }
  if (!refused.ok()) {
    Finish(call, std::move(refused));
    return;
  }
  if (call->tokens.empty()) {
    JOULE_LOG(Debug) << "request " << call->request_id << " -> rank " << rank << " (" << endpoint
                     << ") as " << call->worker_request_id;
  } else {
    JOULE_LOG(Info) << "request " << call->request_id << " resumes on rank " << rank << " ("
                    << endpoint << ") with " << call->tokens.size()
                    << " tokens generated so far, attempt " << call->attempts;
  }
  std::shared_ptr<GenerateCall> worker_call =
      client->Generate(forward, call->deadline, std::make_shared<Relay>(this, call));
  bool cancel_now;
  {
    absl::MutexLock lock(&mu_);
    call->worker_call = worker_call;
    // An abort or a client cancellation may have come before the call existed.
    cancel_now = !call->abort.ok() || call->client_cancelled;
  }
  if (cancel_now) worker_call->Cancel();
}

void Router::OnWorkerResponse(const std::shared_ptr<Call>& call,
                              const v1::GenerateResponse& response) {
  if (call->write_failed) return;  // drain until the cancellation lands
  v1::GenerateResponse out = response;
  out.set_request_id(call->request_id);
  out.set_rank(call->rank);
  call->tokens.insert(call->tokens.end(), response.token_ids().begin(),
                      response.token_ids().end());
  call->finished = call->finished || out.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
  if (call->finished) {
    // The client's usage covers every attempt: all tokens it received, and
    // how many of them a later attempt had to recompute.
    out.set_completion_tokens(static_cast<int32_t>(call->tokens.size()));
    out.set_resumed_tokens(call->resumed_tokens);
  }
  if (!call->sink->Write(out)) {
    call->write_failed = true;
    CancelByClient(call);
  }
}

void Router::CancelByClient(const std::shared_ptr<Call>& call) {
  std::shared_ptr<GenerateCall> worker_call;
  bool parked;
  {
    absl::MutexLock lock(&mu_);
    if (call->client_cancelled) return;
    call->client_cancelled = true;
    worker_call = call->worker_call;
    parked = call->parked;
  }
  JOULE_LOG(Debug) << "request " << call->request_id << ": client gone"
                   << (parked ? " while it waited" : ", cancelling its worker call");
  if (parked) {
    if (Claim(call)) Finish(call, absl::CancelledError("the client cancelled the request"));
    return;
  }
  // Null while Launch has not stored it yet; Launch then cancels.
  if (worker_call != nullptr) worker_call->Cancel();
}

void Router::OnWorkerDone(const std::shared_ptr<Call>& call, const absl::Status& worker_status) {
  {
    absl::MutexLock lock(&mu_);
    --in_flight_[call->rank];
  }
  if (std::optional<absl::Status> outcome = Outcome(*call, worker_status)) {
    AfterAttempt(call, *std::move(outcome));
    return;
  }
  // Did the request fail, or is the worker gone? Ask it directly, without
  // holding this (gRPC) thread while the probe waits.
  call->client->Status(absl::Now() + options_.probe_timeout,
                       [this, call, worker_status](absl::StatusOr<v1::WorkerStatusReply> probe) {
                         AfterAttempt(call, ProbedOutcome(*call, worker_status, probe));
                       });
}

void Router::AfterAttempt(const std::shared_ptr<Call>& call, absl::Status outcome) {
  if (!absl::IsUnavailable(outcome) || call->finished) {
    Finish(call, std::move(outcome));
    return;
  }
  if (std::optional<v1::FinishReason> reason = FinishedByTokens(*call)) {
    // The rank died between the last token and its final message: finish here.
    v1::GenerateResponse last;
    last.set_request_id(call->request_id);
    last.set_rank(call->rank);
    last.set_finish_reason(*reason);
    last.set_prompt_tokens(call->request.prompt_token_ids_size());
    last.set_completion_tokens(static_cast<int32_t>(call->tokens.size()));
    last.set_resumed_tokens(call->resumed_tokens);
    call->finished = true;
    call->sink->Write(last);
    Finish(call, absl::OkStatus());
    return;
  }
  if (!Park(call, &outcome)) {
    Finish(call, std::move(outcome));
    return;
  }
  JOULE_LOG(Info) << "request " << call->request_id << " (" << call->tokens.size()
                  << " tokens so far) will resume: " << outcome.message();
  TryResume(call);
}

std::optional<v1::FinishReason> Router::FinishedByTokens(const Call& call) const {
  if (call.tokens.empty()) return std::nullopt;
  const v1::SamplingParams& s = call.request.sampling();
  const int32_t last = call.tokens.back();
  const auto& eos = membership_->model().eos_token_ids;
  if ((!s.ignore_eos() && std::find(eos.begin(), eos.end(), last) != eos.end()) ||
      std::find(s.stop_token_ids().begin(), s.stop_token_ids().end(), last) !=
          s.stop_token_ids().end()) {
    return v1::FINISH_REASON_STOP;
  }
  if (static_cast<int64_t>(call.tokens.size()) >= s.max_tokens()) return v1::FINISH_REASON_LENGTH;
  return std::nullopt;
}

bool Router::Park(const std::shared_ptr<Call>& call, absl::Status* outcome) {
  absl::MutexLock lock(&mu_);
  if (shutdown_ || call->client_cancelled || call->write_failed || options_.max_resumes <= 0 ||
      absl::Now() >= call->deadline) {
    return false;
  }
  if (call->attempts > options_.max_resumes) {
    *outcome = absl::UnavailableError(
        absl::StrCat(outcome->message(), "; request ", call->request_id, " reached its resume limit (",
                     options_.max_resumes, " resumes, --max-resumes)"));
    return false;
  }
  call->parked = true;
  call->parked_at = absl::Now();
  call->park_reason = std::string(outcome->message());
  call->rank = -1;
  call->worker_call = nullptr;
  call->resumed_tokens += static_cast<int>(call->tokens.size());
  return true;
}

void Router::TryResume(const std::shared_ptr<Call>& call) {
  std::optional<absl::Status> end;
  {
    absl::MutexLock lock(&mu_);
    if (!call->parked) return;
    const absl::Time now = absl::Now();
    if (shutdown_) {
      end = absl::UnavailableError("coordinator is shutting down");
    } else if (call->client_cancelled) {
      end = absl::CancelledError("the client cancelled the request");
    } else if (now >= call->deadline) {
      end = absl::DeadlineExceededError(absl::StrCat(
          "request ", call->request_id, " reached its deadline while it waited to resume (",
          call->park_reason, ")"));
    } else if (now - call->parked_at >= options_.resume_wait) {
      end = absl::UnavailableError(absl::StrCat(
          "request ", call->request_id, " waited ", absl::FormatDuration(options_.resume_wait),
          " for a serving group and gave up (", call->park_reason, ")"));
    }
  }
  if (end.has_value()) {
    if (Claim(call)) Finish(call, *std::move(end));
    return;
  }
  absl::StatusOr<int> rank = PickRank();
  if (rank.ok()) {
    if (Claim(call)) Launch(call, *rank);
    return;
  }
  // A group that re-forms serves again soon: Poll tries again. Otherwise
  // (no rank left, or a group that cannot re-form) waiting would not help.
  if (!Reforming() && Claim(call)) {
    Finish(call, absl::UnavailableError(absl::StrCat(call->park_reason, "; ",
                                                     rank.status().message())));
  }
}

void Router::Finish(const std::shared_ptr<Call>& call, absl::Status outcome) {
  {
    absl::MutexLock lock(&mu_);
    calls_.erase(call->seq);
    by_id_.erase(call->request_id);
  }
  Complete(call, std::move(outcome));
}

void Router::Complete(const std::shared_ptr<Call>& call, absl::Status outcome) {
  if (absl::IsCancelled(outcome) && call->cancel_is_ok) {
    outcome = absl::OkStatus();
  } else if (!outcome.ok() && !absl::IsCancelled(outcome)) {
    JOULE_LOG(Info) << "request " << call->request_id << ": " << outcome;
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
    // The call may outlive Generate() (a resume, a late outcome): once it
    // returned, the client's sink is gone, and asking it would touch freed
    // memory. Under mu_, so that Detach() waits for a question in progress.
    bool ClientGone() const override {
      absl::MutexLock lock(&mu_);
      return gone_ || detached_ || client_->ClientGone();
    }
    void Detach() {
      absl::MutexLock lock(&mu_);
      detached_ = true;
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
    bool detached_ ABSL_GUARDED_BY(mu_) = false;
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
  mailbox->Detach();
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

void Router::Poll(bool expire_heartbeats) {
  if (expire_heartbeats) ExpireHeartbeats();
  // ClientGone() belongs to the front door and may take its locks: ask
  // outside ours.
  std::vector<std::shared_ptr<Call>> live, parked;
  {
    absl::MutexLock lock(&mu_);
    live.reserve(calls_.size());
    for (const auto& [seq, call] : calls_) {
      if (call->client_cancelled) continue;
      (call->parked ? parked : live).push_back(call);
    }
  }
  for (const std::shared_ptr<Call>& call : live) {
    if (call->sink->ClientGone()) CancelByClient(call);
  }
  for (const std::shared_ptr<Call>& call : parked) {
    if (call->sink->ClientGone()) {
      CancelByClient(call);
    } else {
      TryResume(call);
    }
  }
}

void Router::ExpireHeartbeats() {
  HeartbeatExpiry expiry = membership_->ExpireHeartbeats();
  for (const DeadRank& d : expiry.dead) FailRank(d.rank, d.reason);
  for (const SuspectRank& suspect : expiry.suspects) ProbeSuspect(suspect);
}

void Router::ProbeSuspect(const SuspectRank& suspect) {
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;  // stopping: nobody needs the verdict
    ++outstanding_;         // ~Router waits for the callback
  }
  // Asynchronous: the control loop goes on while the probe waits.
  clients_->Connect(suspect.worker_endpoint)
      ->Status(absl::Now() + options_.probe_timeout,
               [this, suspect](absl::StatusOr<v1::WorkerStatusReply> probe) {
                 OnSuspectProbed(suspect, probe.status());
                 Released();
               });
}

void Router::OnSuspectProbed(const SuspectRank& suspect, const absl::Status& probe) {
  // An answer, even UNIMPLEMENTED, shows the worker alive: its heartbeats are late.
  if (probe.ok() || absl::IsUnimplemented(probe)) {
    membership_->KeepSuspect(suspect);
    return;
  }
  // Unreachable, and nothing listens where it served: the process is gone,
  // no late heartbeat can come, so it is dead now rather than at the limit.
  const bool gone = absl::IsUnavailable(probe) && options_.endpoint_refuses &&
                    options_.endpoint_refuses(suspect.worker_endpoint);
  if (std::optional<DeadRank> dead = membership_->SuspectDead(suspect, probe, gone)) {
    FailRank(dead->rank, dead->reason);
  }
}

void Router::FailRank(int rank, const std::string& reason) {
  std::vector<std::shared_ptr<GenerateCall>> to_cancel;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [seq, call] : calls_) {
      if (call->parked || call->rank != rank || !call->abort.ok()) continue;
      call->abort = absl::UnavailableError(absl::StrCat("rank ", rank, " died: ", reason));
      if (call->worker_call != nullptr) to_cancel.push_back(call->worker_call);
    }
  }
  // Outside the lock: a cancelled call may report OnDone on this thread.
  for (const auto& c : to_cancel) c->Cancel();
}

void Router::SendStepPlan(int rank, const RankStepPlan& plan,
                          std::function<void(absl::StatusOr<int>)> done) {
  auto fail = [&](absl::Status s) {
    if (done) done(std::move(s));
  };
  const std::vector<RankInfo> ranks = membership_->Ranks();
  if (rank < 0 || rank >= static_cast<int>(ranks.size()) ||
      ranks[rank].state != RankState::kReady) {
    fail(absl::UnavailableError(absl::StrCat("rank ", rank, " is not ready")));
    return;
  }
  v1::StepPlanRequest request;
  request.set_max_running(plan.max_running);
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) {
      refused = absl::UnavailableError("coordinator is shutting down");
    } else {
      auto worker_id = [&](const std::string& request_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_)
          -> const std::string* {
        auto id = by_id_.find(request_id);
        if (id == by_id_.end()) return nullptr;
        const Call& call = *calls_.at(id->second);
        return !call.parked && call.rank == rank ? &call.worker_request_id : nullptr;
      };
      for (const std::string& id : plan.order) {
        if (const std::string* w = worker_id(id)) request.add_order(*w);
      }
      for (const std::string& id : plan.preempt) {
        if (const std::string* w = worker_id(id)) request.add_preempt(*w);
      }
      // Microseconds since the epoch, or one more than the last: increasing
      // across coordinator restarts too (a worker keeps the highest it saw).
      uint64_t& sequence = plan_sequence_[rank];
      sequence = std::max(sequence + 1, static_cast<uint64_t>(absl::ToUnixMicros(absl::Now())));
      request.set_sequence(sequence);
      ++outstanding_;
    }
  }
  if (!refused.ok()) {
    fail(std::move(refused));
    return;
  }
  std::shared_ptr<WorkerClient> client = clients_->Connect(ranks[rank].worker_endpoint);
  client->SetStepPlan(
      request, absl::Now() + options_.step_plan_timeout,
      [this, rank, done = std::move(done)](absl::StatusOr<v1::StepPlanReply> reply) {
        if (!reply.ok()) {
          bool log = false;
          {
            absl::MutexLock lock(&mu_);
            auto [last, first] = plan_error_logged_.try_emplace(rank, absl::Now());
            if (first || absl::Now() - last->second >= absl::Minutes(1)) {
              last->second = absl::Now();
              log = true;
            }
          }
          if (log) {
            JOULE_LOG(Warning) << "step plan to rank " << rank << " failed (logged at most once "
                               << "a minute per rank): " << reply.status();
          }
        }
        if (done) {
          done(reply.ok() ? absl::StatusOr<int>(reply->preempted())
                          : absl::StatusOr<int>(reply.status()));
        }
        Released();
      });
}

void Router::Shutdown() {
  std::vector<std::shared_ptr<GenerateCall>> to_cancel;
  std::vector<std::shared_ptr<Call>> parked;
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
    for (auto& [seq, call] : calls_) {
      if (call->parked) {
        parked.push_back(call);
        continue;
      }
      if (!call->abort.ok()) continue;
      call->abort = absl::UnavailableError("coordinator is shutting down");
      if (call->worker_call != nullptr) to_cancel.push_back(call->worker_call);
    }
  }
  for (const auto& c : to_cancel) c->Cancel();
  for (const auto& call : parked) TryResume(call);  // ends it: shutting down
}

RouterStats Router::stats() const {
  absl::MutexLock lock(&mu_);
  RouterStats out = stats_;
  out.parked = 0;
  for (const auto& [seq, call] : calls_) out.parked += call->parked ? 1 : 0;
  return out;
}

int Router::InFlight(int rank) const {
  absl::MutexLock lock(&mu_);
  return rank >= 0 && static_cast<size_t>(rank) < in_flight_.size() ? in_flight_[rank] : 0;
}

}  // namespace joule::cluster
