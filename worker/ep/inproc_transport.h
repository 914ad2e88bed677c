// In-process transport: N ranks as threads of one process, for unit tests and
// the single-host demo. Exchanges are memcpy through a shared rendezvous.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "worker/ep/transport.h"

namespace joule::ep {

// Owns the shared state; hands out one Transport per rank. Each rank's
// Transport must be used by one thread at a time (its rank's thread).
class InProcessGroup {
 public:
  InProcessGroup(int world_size, TransportOptions options = {});
  ~InProcessGroup();

  int world_size() const { return world_size_; }
  // The transport for `rank`; the group must outlive it.
  std::unique_ptr<Transport> Rank(int rank);

  // Test hook: marks `rank` as gone; its peers' pending and later collectives
  // fail with Unavailable, as a crashed process would make them.
  void Kill(int rank);
  // Breaks the group: every rank's pending and later collectives fail with
  // Aborted naming `reason` (Transport::Interrupt of any rank).
  void Interrupt(const std::string& reason);

 private:
  friend class InProcessTransport;
  struct Slot {
    const void* send = nullptr;
    const size_t* send_counts = nullptr;
    const size_t* send_offsets = nullptr;
    size_t bytes = 0;  // all-gather contribution
  };
  // One collective round: every rank posts, copies what it needs, then leaves.
  absl::Status Exchange(int rank, const Slot& mine,
                        const std::function<void(const std::vector<Slot>&)>& copy);

  const int world_size_;
  const TransportOptions options_;
  absl::Mutex mu_;
  uint64_t round_ ABSL_GUARDED_BY(mu_) = 0;
  int posted_ ABSL_GUARDED_BY(mu_) = 0;
  int done_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> dead_ ABSL_GUARDED_BY(mu_);
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  // Why the group broke; ranks that were waiting in the failing round get it too.
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::ep
