// In-memory WorkerClient for tests: every Generate call opens a FakeStream that
// the test feeds (Push/Close) or that replays a script, and that records
// whether the coordinator cancelled it; the client also keeps the step plans
// it was sent (SetStepPlan).
//
// Events reach the observer on the thread that caused them (the test's Push or
// Close, the coordinator's Cancel), one at a time: an event raised while
// another is being delivered (a Cancel from inside OnResponse) is delivered
// by that thread after the current one returns, as gRPC would order them.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/cluster/worker_client.h"

namespace joule::cluster {

class FakeStream final : public GenerateCall {
 public:
  FakeStream(v1::GenerateRequest request, absl::Time deadline,
             std::shared_ptr<GenerateObserver> observer)
      : request_(std::move(request)), deadline_(deadline), observer_(std::move(observer)) {}

  // The worker sends a message (ignored once the stream ended).
  void Push(v1::GenerateResponse response) { Deliver(Event{std::move(response), {}}); }
  // The worker ends the stream with `status`.
  void Close(absl::Status status) { Deliver(Event{std::nullopt, std::move(status)}); }

  // The coordinator cancels: the stream ends with CANCELLED unless it already ended.
  void Cancel() override {
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
    }
    Close(absl::CancelledError("cancelled by the coordinator"));
  }

  bool cancelled() const {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }
  // Blocks until cancelled or `timeout` passes; returns cancelled().
  bool WaitCancelled(absl::Duration timeout) const {
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&cancelled_), timeout);
    return cancelled_;
  }
  // True once OnDone has been delivered.
  bool ended() const {
    absl::MutexLock lock(&mu_);
    return done_delivered_;
  }
  const v1::GenerateRequest& request() const { return request_; }
  absl::Time deadline() const { return deadline_; }

 private:
  struct Event {
    std::optional<v1::GenerateResponse> response;  // empty: the end, with `status`
    absl::Status status;
  };

  void Deliver(Event event) {
    {
      absl::MutexLock lock(&mu_);
      if (ended_) return;
      ended_ = !event.response.has_value();
      events_.push_back(std::move(event));
      if (delivering_) return;  // the thread delivering now will get to it
      delivering_ = true;
    }
    while (true) {
      Event next;
      {
        absl::MutexLock lock(&mu_);
        if (events_.empty()) {
          delivering_ = false;
          return;
        }
        next = std::move(events_.front());
        events_.pop_front();
      }
      // observer_ is only touched by the one delivering thread.
      if (next.response.has_value()) {
        observer_->OnResponse(*next.response);
      } else {
        std::shared_ptr<GenerateObserver> observer = std::move(observer_);
        observer->OnDone(std::move(next.status));
        absl::MutexLock lock(&mu_);
        done_delivered_ = true;
      }
    }
  }

  const v1::GenerateRequest request_;
  const absl::Time deadline_;
  std::shared_ptr<GenerateObserver> observer_;
  mutable absl::Mutex mu_;
  std::deque<Event> events_ ABSL_GUARDED_BY(mu_);
  bool delivering_ ABSL_GUARDED_BY(mu_) = false;
  bool ended_ ABSL_GUARDED_BY(mu_) = false;  // the end is queued or delivered
  bool done_delivered_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

class FakeWorkerClient final : public WorkerClient {
 public:
  // When set, every new stream is fed these responses and closed with `final`
  // before Generate returns (a worker that answers at once).
  void SetScript(std::vector<v1::GenerateResponse> responses, absl::Status final = absl::OkStatus()) {
    absl::MutexLock lock(&mu_);
    script_ = std::move(responses);
    script_final_ = std::move(final);
    scripted_ = true;
  }
  void SetStatusReply(absl::StatusOr<v1::WorkerStatusReply> reply) {
    absl::MutexLock lock(&mu_);
    status_ = std::move(reply);
  }
  // Status probes wait (unanswered) until ReleaseStatusReplies, like a worker
  // that takes its time to answer.
  void HoldStatusReplies() {
    absl::MutexLock lock(&mu_);
    hold_status_ = true;
  }
  void ReleaseStatusReplies() {
    std::vector<StatusCallback> held;
    absl::StatusOr<v1::WorkerStatusReply> reply;
    {
      absl::MutexLock lock(&mu_);
      hold_status_ = false;
      held.swap(held_status_);
      reply = status_;
    }
    for (auto& done : held) done(reply);
  }

  std::shared_ptr<GenerateCall> Generate(const v1::GenerateRequest& request, absl::Time deadline,
                                         std::shared_ptr<GenerateObserver> observer) override {
    auto s = std::make_shared<FakeStream>(request, deadline, std::move(observer));
    std::optional<std::vector<v1::GenerateResponse>> script;
    absl::Status final;
    {
      absl::MutexLock lock(&mu_);
      streams_.push_back(s);
      if (scripted_) {
        script = script_;
        final = script_final_;
      }
    }
    if (script.has_value()) {
      for (const auto& r : *script) s->Push(r);
      s->Close(final);
    }
    return s;
  }
  void Status(absl::Time deadline, StatusCallback done) override {
    absl::StatusOr<v1::WorkerStatusReply> reply;
    {
      absl::MutexLock lock(&mu_);
      ++status_calls_;
      if (hold_status_) {
        held_status_.push_back(std::move(done));
        return;
      }
      reply = status_;
    }
    done(std::move(reply));
  }

  void SetStepPlan(const v1::StepPlanRequest& plan, absl::Time /*deadline*/,
                   StepPlanCallback done) override {
    absl::StatusOr<v1::StepPlanReply> reply;
    {
      absl::MutexLock lock(&mu_);
      plans_.push_back(plan);
      plan_times_.push_back(absl::Now());
      reply = plan_reply_;
    }
    done(std::move(reply));
  }
  // What SetStepPlan answers (default: nothing preempted).
  void SetStepPlanReply(absl::StatusOr<v1::StepPlanReply> reply) {
    absl::MutexLock lock(&mu_);
    plan_reply_ = std::move(reply);
  }
  // The step plans received so far, oldest first.
  std::vector<v1::StepPlanRequest> plans() const {
    absl::MutexLock lock(&mu_);
    return plans_;
  }
  // When each of plans() arrived.
  std::vector<absl::Time> plan_times() const {
    absl::MutexLock lock(&mu_);
    return plan_times_;
  }
  // Waits until a received plan satisfies `pred`; the first such, or nullopt on timeout.
  std::optional<v1::StepPlanRequest> WaitForPlan(
      const std::function<bool(const v1::StepPlanRequest&)>& pred,
      absl::Duration timeout = absl::Seconds(10)) {
    absl::MutexLock lock(&mu_);
    std::optional<v1::StepPlanRequest> found;
    auto seen = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const v1::StepPlanRequest& p : plans_) {
        if (pred(p)) {
          found = p;
          return true;
        }
      }
      return false;
    };
    mu_.AwaitWithTimeout(absl::Condition(&seen), timeout);
    return found;
  }

  // Waits until at least `n` Generate calls arrived; nullptr on timeout.
  std::shared_ptr<FakeStream> WaitForStream(size_t n = 1, absl::Duration timeout = absl::Seconds(10)) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return streams_.size() >= n; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
    return streams_.size() >= n ? streams_[n - 1] : nullptr;
  }
  size_t generate_calls() const {
    absl::MutexLock lock(&mu_);
    return streams_.size();
  }
  int status_calls() const {
    absl::MutexLock lock(&mu_);
    return status_calls_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::shared_ptr<FakeStream>> streams_ ABSL_GUARDED_BY(mu_);
  bool scripted_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<v1::GenerateResponse> script_ ABSL_GUARDED_BY(mu_);
  absl::Status script_final_ ABSL_GUARDED_BY(mu_);
  absl::StatusOr<v1::WorkerStatusReply> status_ ABSL_GUARDED_BY(mu_) = v1::WorkerStatusReply();
  int status_calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool hold_status_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<StatusCallback> held_status_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::StepPlanRequest> plans_ ABSL_GUARDED_BY(mu_);
  std::vector<absl::Time> plan_times_ ABSL_GUARDED_BY(mu_);
  absl::StatusOr<v1::StepPlanReply> plan_reply_ ABSL_GUARDED_BY(mu_) = v1::StepPlanReply();
};

class FakeWorkerClientFactory final : public WorkerClientFactory {
 public:
  std::shared_ptr<WorkerClient> Connect(const std::string& endpoint) override { return Get(endpoint); }
  // The client for `endpoint`, created on first use.
  std::shared_ptr<FakeWorkerClient> Get(const std::string& endpoint) {
    absl::MutexLock lock(&mu_);
    auto& c = clients_[endpoint];
    if (!c) c = std::make_shared<FakeWorkerClient>();
    return c;
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<FakeWorkerClient>> clients_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::cluster
