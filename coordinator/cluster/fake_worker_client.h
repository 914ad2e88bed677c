// In-memory WorkerClient for tests: every Generate call opens a FakeStream that
// the test feeds (Push/Close) or that replays a script, and that records
// whether the coordinator cancelled it.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/cluster/worker_client.h"

namespace joule::cluster {

class FakeStream {
 public:
  void Push(v1::GenerateResponse response) {
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(response));
  }
  void Close(absl::Status status) {
    absl::MutexLock lock(&mu_);
    closed_ = true;
    final_ = std::move(status);
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
  const v1::GenerateRequest& request() const { return request_; }
  absl::Time deadline() const { return deadline_; }

 private:
  friend class FakeWorkerClient;
  friend class FakeGenerateStream;
  v1::GenerateRequest request_;
  absl::Time deadline_;
  mutable absl::Mutex mu_;
  std::deque<v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_ ABSL_GUARDED_BY(mu_);
};

class FakeGenerateStream final : public GenerateStream {
 public:
  explicit FakeGenerateStream(std::shared_ptr<FakeStream> s) : s_(std::move(s)) {}
  bool Read(v1::GenerateResponse* response) override {
    absl::MutexLock lock(&s_->mu_);
    s_->mu_.Await(absl::Condition(
        +[](FakeStream* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
          return !s->queue_.empty() || s->closed_ || s->cancelled_;
        },
        s_.get()));
    if (s_->cancelled_ || s_->queue_.empty()) return false;
    *response = std::move(s_->queue_.front());
    s_->queue_.pop_front();
    return true;
  }
  void Cancel() override {
    absl::MutexLock lock(&s_->mu_);
    s_->cancelled_ = true;
  }
  absl::Status Finish() override {
    absl::MutexLock lock(&s_->mu_);
    if (s_->cancelled_) return absl::CancelledError("cancelled by the coordinator");
    return s_->final_;
  }

 private:
  std::shared_ptr<FakeStream> s_;
};

class FakeWorkerClient final : public WorkerClient {
 public:
  // When set, every new stream is pre-filled with these responses and closed
  // with `final` (a worker that answers at once).
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

  std::unique_ptr<GenerateStream> Generate(const v1::GenerateRequest& request,
                                           absl::Time deadline) override {
    auto s = std::make_shared<FakeStream>();
    s->request_ = request;
    s->deadline_ = deadline;
    absl::MutexLock lock(&mu_);
    if (scripted_) {
      for (const auto& r : script_) s->Push(r);
      s->Close(script_final_);
    }
    streams_.push_back(s);
    return std::make_unique<FakeGenerateStream>(std::move(s));
  }
  absl::StatusOr<v1::WorkerStatusReply> Status(absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    ++status_calls_;
    return status_;
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
