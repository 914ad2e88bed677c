#include "coordinator/cluster/router.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "scheduler/tier.h"

namespace joule::cluster {
Router::Router(Membership* membership, WorkerClientFactory* clients, RouterOptions options)
    : membership_(membership), clients_(clients), options_(options) {}

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
  std::vector<int> in_flight(n, 0);
  for (const auto& [seq, call] : calls_) ++in_flight[call->rank];
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

void Router::AbortLocked(Call* call, absl::Status why) {
  if (!call->abort.ok()) return;
  call->abort = std::move(why);
  if (call->stream != nullptr) call->stream->Cancel();
}

absl::Status Router::Generate(const v1::GenerateRequest& request, absl::Time client_deadline,
                              GenerateSink* sink) {
  RETURN_IF_ERROR(Validate(request));
  ASSIGN_OR_RETURN(const int rank, PickRank());
  const std::string endpoint = membership_->Ranks()[rank].worker_endpoint;
  std::shared_ptr<WorkerClient> client = clients_->Connect(endpoint);

  v1::GenerateRequest forward = request;
  // Workers get our tier names (scheduler/tier.h), whatever the client spelled.
  forward.set_service_tier(std::string(
      scheduler::TierName(scheduler::ParseServiceTier(request.service_tier()).value())));
  if (forward.sampling().top_p() == 0) forward.mutable_sampling()->set_top_p(1.0f);

  Call call;
  call.rank = rank;
  call.sink = sink;
  uint64_t seq;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return absl::UnavailableError("coordinator is shutting down");
    seq = next_call_++;
    if (request.request_id().empty()) {
      forward.set_request_id(absl::StrCat("req-", seq));
    } else {
      for (const auto& [other_seq, other] : calls_) {
        if (other->request_id == request.request_id()) {
          return absl::AlreadyExistsError(absl::StrCat(
              "request_id: '", request.request_id(), "' is already in flight; ids must be unique"));
        }
      }
    }
    call.request_id = forward.request_id();
    calls_[seq] = &call;
  }
  JOULE_LOG(Debug) << "request " << call.request_id << " -> rank " << rank << " (" << endpoint
                   << ")";

  const absl::Time deadline = std::min(client_deadline, absl::Now() + options_.request_timeout);
  std::unique_ptr<GenerateStream> stream = client->Generate(forward, deadline);
  {
    absl::MutexLock lock(&mu_);
    call.stream = stream.get();
    // An abort or a client cancellation may have come before the stream existed.
    if (!call.abort.ok() || call.client_cancelled) stream->Cancel();
  }

  bool finished = false;
  bool client_gone = false;
  v1::GenerateResponse response;
  while (stream->Read(&response)) {
    if (client_gone) continue;  // drain until the cancellation lands
    response.set_request_id(call.request_id);
    response.set_rank(rank);
    finished = finished || response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
    if (!sink->Write(response)) {
      client_gone = true;
      absl::MutexLock lock(&mu_);
      call.client_cancelled = true;
      stream->Cancel();
    }
  }
  const absl::Status worker_status = stream->Finish();
  {
    absl::MutexLock lock(&mu_);
    calls_.erase(seq);
  }
  stream.reset();
  absl::Status outcome = Outcome(call, worker_status, client.get(), finished);
  if (!outcome.ok()) {
    JOULE_LOG(Info) << "request " << call.request_id << " on rank " << rank << ": " << outcome;
  }
  return outcome;
}

absl::Status Router::Outcome(const Call& call, const absl::Status& worker_status,
                             WorkerClient* client, bool finished) {
  if (!call.abort.ok()) return call.abort;
  if (call.client_cancelled) {
    return absl::CancelledError("the client cancelled the request; the worker was told to drop it");
  }
  if (worker_status.ok()) {
    if (!finished) {
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
      break;
  }
  // Did the request fail, or is the worker gone? Ask it directly.
  auto probe = client->Status(absl::Now() + options_.probe_timeout);
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
  absl::MutexLock lock(&mu_);
  for (auto& [seq, call] : calls_) {
    if (call->client_cancelled || !call->sink->ClientGone()) continue;
    call->client_cancelled = true;
    if (call->stream != nullptr) call->stream->Cancel();
    JOULE_LOG(Debug) << "request " << call->request_id << ": client gone, cancelling on rank "
                     << call->rank;
  }
}

void Router::FailRank(int rank, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  for (auto& [seq, call] : calls_) {
    if (call->rank != rank) continue;
    AbortLocked(call, absl::UnavailableError(absl::StrCat("rank ", rank, " died: ", reason)));
  }
}

void Router::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
  for (auto& [seq, call] : calls_) {
    AbortLocked(call, absl::UnavailableError("coordinator is shutting down"));
  }
}

int Router::InFlight(int rank) const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [seq, call] : calls_) n += call->rank == rank;
  return n;
}

}  // namespace joule::cluster
