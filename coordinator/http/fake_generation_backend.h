// In-memory GenerationBackend for tests. Each GenerateAsync call becomes a
// FakeGeneration that the test drives from its own thread (Push, Finish), as
// the Router drives a sink from gRPC's threads; or, with SetScript or
// SetResponder, every call is answered at once. Records cancellations and lets tests set readiness and
// validation results.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/http/generation_backend.h"

namespace joule::http {

class FakeGeneration {
 public:
  FakeGeneration(v1::GenerateRequest request, std::shared_ptr<cluster::GenerateSink> sink,
                 std::function<void(absl::Status)> done)
      : request_(std::move(request)), sink_(std::move(sink)), done_(std::move(done)) {}

  const v1::GenerateRequest& request() const { return request_; }

  // Writes one response; false when the sink refused it (client gone), as the
  // Router sees it. No-op after Finish.
  bool Push(std::vector<int32_t> token_ids, v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED) {
    absl::MutexLock lock(&mu_);
    if (finished_) return false;
    v1::GenerateResponse r;
    r.set_request_id(request_.request_id());
    for (int32_t id : token_ids) r.add_token_ids(id);
    r.set_finish_reason(finish);
    return sink_->Write(r);
  }

  // Writes `response` (its request id set to the call's); as Push otherwise.
  bool PushResponse(v1::GenerateResponse response) {
    absl::MutexLock lock(&mu_);
    if (finished_) return false;
    response.set_request_id(request_.request_id());
    return sink_->Write(response);
  }

  // Ends the call with `status` (runs `done`); only the first call counts.
  void Finish(absl::Status status = absl::OkStatus()) {
    std::function<void(absl::Status)> done;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
      done = std::move(done_);
    }
    done(std::move(status));
    absl::MutexLock lock(&mu_);
    sink_.reset();  // the Router lets go of the sink after `done`
  }

  bool finished() const {
    absl::MutexLock lock(&mu_);
    return finished_;
  }
  bool client_gone() const {
    absl::MutexLock lock(&mu_);
    return sink_ != nullptr && sink_->ClientGone();
  }

 private:
  const v1::GenerateRequest request_;
  mutable absl::Mutex mu_;
  std::shared_ptr<cluster::GenerateSink> sink_ ABSL_GUARDED_BY(mu_);
  std::function<void(absl::Status)> done_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class FakeGenerationBackend final : public GenerationBackend {
 public:
  // Every later call is answered inside GenerateAsync: `token_ids` in one
  // response each, the last one with `finish`, then done(OK).
  void SetScript(std::vector<int32_t> token_ids, v1::FinishReason finish = v1::FINISH_REASON_LENGTH) {
    absl::MutexLock lock(&mu_);
    script_ = std::move(token_ids);
    script_finish_ = finish;
    scripted_ = true;
  }
  // Every later call is answered inside GenerateAsync with what `responder`
  // makes of its request (e.g. tokens with log probabilities), then done(OK).
  using Responder = std::function<std::vector<v1::GenerateResponse>(const v1::GenerateRequest&)>;
  void SetResponder(Responder responder) {
    absl::MutexLock lock(&mu_);
    responder_ = std::move(responder);
  }
  void SetReady(absl::Status ready) {
    absl::MutexLock lock(&mu_);
    ready_ = std::move(ready);
  }
  void SetValidation(absl::Status status) {
    absl::MutexLock lock(&mu_);
    validation_ = std::move(status);
  }
  // Outcome of every later call, delivered through `done` before any response
  // (as the Router reports validation errors and an unready cluster).
  void SetStartError(absl::Status status) {
    absl::MutexLock lock(&mu_);
    start_error_ = std::move(status);
  }

  absl::Status Validate(const v1::GenerateRequest& request) const override {
    absl::MutexLock lock(&mu_);
    return validation_;
  }
  absl::Status Ready() const override {
    absl::MutexLock lock(&mu_);
    return ready_;
  }

  void GenerateAsync(const v1::GenerateRequest& request, absl::Time deadline,
                     std::shared_ptr<cluster::GenerateSink> sink,
                     std::function<void(absl::Status)> done) override {
    auto call = std::make_shared<FakeGeneration>(request, std::move(sink), std::move(done));
    absl::Status start_error;
    bool scripted;
    std::vector<int32_t> script;
    v1::FinishReason finish;
    Responder responder;
    {
      absl::MutexLock lock(&mu_);
      calls_.push_back(call);
      start_error = start_error_;
      scripted = scripted_;
      script = script_;
      finish = script_finish_;
      responder = responder_;
    }
    if (!start_error.ok()) {
      call->Finish(start_error);
      return;
    }
    if (responder) {
      for (v1::GenerateResponse& r : responder(request)) {
        if (!call->PushResponse(std::move(r))) break;
      }
      call->Finish();
      return;
    }
    if (!scripted) return;
    for (size_t i = 0; i < script.size(); ++i) {
      if (!call->Push({script[i]}, i + 1 == script.size() ? finish : v1::FINISH_REASON_UNSPECIFIED)) break;
    }
    call->Finish();
  }

  // As the Router: the call ends OK (cancelled by its client).
  void Cancel(const std::string& request_id) override {
    std::shared_ptr<FakeGeneration> found;
    {
      absl::MutexLock lock(&mu_);
      for (auto& c : calls_) {
        if (c->request().request_id() == request_id) found = c;
      }
    }
    if (found) found->Finish();
    // Recorded after the call ended, so WaitCancelled sees both.
    absl::MutexLock lock(&mu_);
    cancelled_.push_back(request_id);
  }

  // Waits until at least `n` calls arrived; the n-th (1-based), or null on timeout.
  std::shared_ptr<FakeGeneration> WaitForCall(size_t n = 1, absl::Duration timeout = absl::Seconds(10)) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_.size() >= n; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
    return calls_.size() >= n ? calls_[n - 1] : nullptr;
  }
  // Waits until `request_id` was cancelled; false on timeout.
  bool WaitCancelled(const std::string& request_id, absl::Duration timeout = absl::Seconds(10)) {
    absl::MutexLock lock(&mu_);
    auto found = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const auto& id : cancelled_) {
        if (id == request_id) return true;
      }
      return false;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&found), timeout);
  }
  size_t calls() const {
    absl::MutexLock lock(&mu_);
    return calls_.size();
  }
  std::vector<std::string> cancelled() const {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::shared_ptr<FakeGeneration>> calls_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> cancelled_ ABSL_GUARDED_BY(mu_);
  absl::Status ready_ ABSL_GUARDED_BY(mu_);
  absl::Status validation_ ABSL_GUARDED_BY(mu_);
  absl::Status start_error_ ABSL_GUARDED_BY(mu_);
  bool scripted_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<int32_t> script_ ABSL_GUARDED_BY(mu_);
  v1::FinishReason script_finish_ ABSL_GUARDED_BY(mu_) = v1::FINISH_REASON_LENGTH;
  Responder responder_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::http
