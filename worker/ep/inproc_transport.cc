#include "worker/ep/inproc_transport.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace joule::ep {

// Ranks are threads of one process: a window is plain memory, shared by address.
class InProcessWindows final : public SharedWindows {
 public:
  InProcessWindows(int world, size_t bytes)
      : SharedWindows(world, bytes), own_(AllocateHostBuffer(std::max<size_t>(bytes, 1))) {}
  HostBuffer own_;
  using SharedWindows::ptrs_;
};

class InProcessTransport : public Transport {
 public:
  InProcessTransport(InProcessGroup* group, int rank) : group_(group), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size(); }
  std::string name() const override { return "inproc"; }

  absl::Status AllGather(const void* in, size_t bytes, void* out) override {
    InProcessGroup::Slot mine{.send = in, .bytes = bytes};
    return group_->Exchange(rank_, mine, [&](const std::vector<InProcessGroup::Slot>& slots) {
      if (bytes == 0) return;  // buffers may be null; memcpy must not see them
      for (int r = 0; r < world_size(); ++r) {
        std::memcpy(static_cast<char*>(out) + r * bytes, slots[r].send, bytes);
      }
    });
  }

  absl::StatusOr<std::unique_ptr<SharedWindows>> MapSharedWindows(size_t bytes) override {
    auto win = std::make_unique<InProcessWindows>(world_size(), bytes);
    const uint64_t mine = reinterpret_cast<uintptr_t>(win->own_.get());
    std::vector<uint64_t> all(world_size());
    if (absl::Status s = AllGather(&mine, sizeof(mine), all.data()); !s.ok()) return s;
    for (int r = 0; r < world_size(); ++r) win->ptrs_[r] = reinterpret_cast<std::byte*>(all[r]);
    return std::unique_ptr<SharedWindows>(std::move(win));
  }

  absl::Status AllToAllV(const void* send, const size_t* send_counts, const size_t* send_offsets,
                         void* recv, const size_t* recv_counts, const size_t* recv_offsets) override {
    InProcessGroup::Slot mine{.send = send, .send_counts = send_counts, .send_offsets = send_offsets};
    absl::Status mismatch;
    absl::Status s = group_->Exchange(rank_, mine, [&](const std::vector<InProcessGroup::Slot>& slots) {
      for (int p = 0; p < world_size(); ++p) {
        const size_t n = slots[p].send_counts[rank_];
        if (n != recv_counts[p]) {
          mismatch = absl::InvalidArgumentError(absl::StrCat(
              "all-to-all-v: rank ", p, " sends ", n, " bytes to rank ", rank_, " which expects ",
              recv_counts[p]));
          continue;
        }
        if (n == 0) continue;
        std::memcpy(static_cast<char*>(recv) + recv_offsets[p],
                    static_cast<const char*>(slots[p].send) + slots[p].send_offsets[rank_], n);
      }
    });
    return s.ok() ? mismatch : s;
  }

  void Interrupt(const std::string& reason) override { group_->Interrupt(reason); }

 private:
  InProcessGroup* group_;
  int rank_;
};

InProcessGroup::InProcessGroup(int world_size, TransportOptions options)
    : world_size_(world_size), options_(options), slots_(world_size), dead_(world_size, false) {}

InProcessGroup::~InProcessGroup() = default;

std::unique_ptr<Transport> InProcessGroup::Rank(int rank) {
  return std::make_unique<InProcessTransport>(this, rank);
}

void InProcessGroup::Kill(int rank) {
  absl::MutexLock lock(&mu_);
  dead_[rank] = true;
}

void InProcessGroup::Interrupt(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  broken_ = true;
  if (failure_.ok()) failure_ = absl::AbortedError(absl::StrCat("in-process transport: interrupted: ", reason));
}

absl::Status InProcessGroup::Exchange(int rank, const Slot& mine,
                                      const std::function<void(const std::vector<Slot>&)>& copy) {
  absl::MutexLock lock(&mu_);
  // `in_round`: the caller was already waiting in the round that failed, so
  // it gets that round's error (every waiting rank sees DeadlineExceeded,
  // not just the first to time out); later calls fail fast.
  auto failed = [&](bool in_round) -> absl::Status {
    for (int r = 0; r < world_size_; ++r) {
      if (dead_[r]) {
        broken_ = true;
        return absl::UnavailableError(absl::StrCat("in-process transport: rank ", r, " is gone"));
      }
    }
    if (broken_) {
      if ((in_round || absl::IsAborted(failure_)) && !failure_.ok()) return failure_;
      return absl::FailedPreconditionError("in-process transport: the group failed earlier");
    }
    return absl::OkStatus();
  };
  auto time_out = [&](absl::Status status) {
    broken_ = true;
    if (failure_.ok()) failure_ = status;
    return status;
  };
  if (absl::Status s = failed(false); !s.ok()) return s;
  const uint64_t round = round_;
  slots_[rank] = mine;
  ++posted_;
  // Phase 1: everyone has posted; the slots stay valid until phase 2 ends.
  auto all_posted = [&]() {
    if (broken_ || round_ != round) return true;
    for (bool d : dead_) if (d) return true;
    return posted_ == world_size_;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&all_posted), options_.timeout)) {
    return time_out(absl::DeadlineExceededError(
        absl::StrCat("in-process transport: rank ", rank, " waited ",
                     absl::FormatDuration(options_.timeout), " for its peers (", posted_, " of ",
                     world_size_, " ranks joined)")));
  }
  if (absl::Status s = failed(true); !s.ok()) return s;
  copy(slots_);
  // Phase 2: everyone has copied; the last one opens the next round.
  ++done_;
  if (done_ == world_size_) {
    posted_ = 0;
    done_ = 0;
    ++round_;
    return absl::OkStatus();
  }
  auto round_over = [&]() {
    if (broken_ || round_ != round) return true;
    for (bool d : dead_) if (d) return true;
    return false;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&round_over), options_.timeout)) {
    return time_out(
        absl::DeadlineExceededError("in-process transport: peers did not finish the exchange"));
  }
  if (round_ != round) return absl::OkStatus();
  return failed(true);
}

}  // namespace joule::ep
