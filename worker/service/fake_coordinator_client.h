// A scripted CoordinatorClient for tests: records what the worker sends and
// answers with whatever the test set.
#pragma once

#include <vector>

#include "absl/synchronization/mutex.h"
#include "worker/service/coordinator_client.h"

namespace joule::worker {

class FakeCoordinatorClient : public CoordinatorClient {
 public:
  absl::StatusOr<v1::RegisterReply> Register(const v1::RegisterRequest& request) override {
    absl::MutexLock lock(&mu_);
    registers_.push_back(request);
    return register_reply_;
  }
  absl::StatusOr<v1::RendezvousReply> Rendezvous(const v1::RendezvousRequest& request,
                                                 absl::Duration timeout) override {
    absl::MutexLock lock(&mu_);
    return rendezvous_reply_;
  }
  absl::StatusOr<v1::HeartbeatReply> Heartbeat(const v1::HeartbeatRequest& request) override {
    absl::MutexLock lock(&mu_);
    heartbeats_.push_back(request);
    if (!heartbeat_status_.ok()) return heartbeat_status_;
    return heartbeat_reply_;
  }

  // What the next calls return.
  void set_register_reply(absl::StatusOr<v1::RegisterReply> r) {
    absl::MutexLock lock(&mu_);
    register_reply_ = std::move(r);
  }
  void set_rendezvous_reply(absl::StatusOr<v1::RendezvousReply> r) {
    absl::MutexLock lock(&mu_);
    rendezvous_reply_ = std::move(r);
  }
  void set_heartbeat_reply(v1::HeartbeatReply r) {
    absl::MutexLock lock(&mu_);
    heartbeat_reply_ = std::move(r);
  }
  // Not OK: heartbeats fail with it (coordinator unreachable).
  void set_heartbeat_status(absl::Status s) {
    absl::MutexLock lock(&mu_);
    heartbeat_status_ = std::move(s);
  }

  std::vector<v1::HeartbeatRequest> heartbeats() const {
    absl::MutexLock lock(&mu_);
    return heartbeats_;
  }
  std::vector<v1::RegisterRequest> registers() const {
    absl::MutexLock lock(&mu_);
    return registers_;
  }

 private:
  mutable absl::Mutex mu_;
  absl::StatusOr<v1::RegisterReply> register_reply_ ABSL_GUARDED_BY(mu_);
  absl::StatusOr<v1::RendezvousReply> rendezvous_reply_ ABSL_GUARDED_BY(mu_);
  v1::HeartbeatReply heartbeat_reply_ ABSL_GUARDED_BY(mu_);
  absl::Status heartbeat_status_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::RegisterRequest> registers_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::HeartbeatRequest> heartbeats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::worker
