// Transport: the only place ranks exchange tensors.
//
// Collectives over plain buffers (host memory, or device memory for
// transports that say so). Every call either completes on every rank or
// returns an error on every rank that can still tell: a peer that does not
// show up within the timeout gives DeadlineExceeded, a peer that went away
// gives Unavailable — never a hang. After an error the transport is broken
// and every later call fails fast with FailedPrecondition; the owner rebuilds
// the group.
//
// All ranks must issue the same sequence of collectives (lockstep).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace joule::ep {

enum class MemoryKind { kHost, kDevice };

struct TransportOptions {
  absl::Duration timeout = absl::Seconds(10);  // per collective
};

// Memory every rank of a group can load and store through plain pointers:
// rank r's window is at(r) in this process (this rank's own included), all of
// bytes() long. From Transport::MapSharedWindows. Released by its destructor;
// it may outlive the transport (the transport then releases it first, and the
// pointers must no longer be used).
class SharedWindows {
 public:
  virtual ~SharedWindows() = default;
  std::byte* at(int rank) const { return ptrs_[rank]; }
  size_t bytes() const { return bytes_; }

 protected:
  // The transport fills in ptrs_ as it maps each rank's window.
  SharedWindows(int world, size_t bytes) : ptrs_(world, nullptr), bytes_(bytes) {}
  std::vector<std::byte*> ptrs_;
  const size_t bytes_;
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual MemoryKind memory_kind() const { return MemoryKind::kHost; }
  // Short name for logs and metrics: "inproc", "ucx", "nccl".
  virtual std::string name() const = 0;

  // Optional hint that [ptr, ptr+bytes) will be used in collectives many
  // times (UCX maps it for zero-copy RDMA). Unregistered buffers still work.
  virtual absl::Status RegisterBuffer(void* ptr, size_t bytes) { return absl::OkStatus(); }

  // Every rank contributes `bytes` bytes from `in`; `out` receives
  // world_size * bytes, rank r's contribution at offset r * bytes.
  virtual absl::Status AllGather(const void* in, size_t bytes, void* out) = 0;

  // Rank r receives send_counts[r] bytes starting at send + send_offsets[r]
  // from this rank; this rank receives recv_counts[p] bytes from rank p into
  // recv + recv_offsets[p]. Counts must agree pairwise (exchange them first,
  // e.g. with AllGather). Zero counts are allowed, including all zero.
  // All arrays have world_size entries; sizes are bytes.
  virtual absl::Status AllToAllV(const void* send, const size_t* send_counts,
                                 const size_t* send_offsets, void* recv,
                                 const size_t* recv_counts, const size_t* recv_offsets) = 0;

  // Collective: every rank allocates a window of `bytes` (the same on every
  // rank) and maps every peer's, so ranks can write each other's memory
  // directly (ranks on one host). Unimplemented on every rank when some rank
  // cannot map a peer's window; callers then exchange through AllToAllV.
  // Writes become visible to a peer once both have passed a later collective
  // (e.g. Barrier).
  virtual absl::StatusOr<std::unique_ptr<SharedWindows>> MapSharedWindows(size_t bytes);

  // Thread-safe, from any thread: the collective this rank is waiting in (and
  // every later one) fails at once with Aborted "...interrupted: <reason>"
  // instead of waiting for a peer that will not come; the owner is about to
  // rebuild the group (a membership change). The transport is broken after.
  virtual void Interrupt(const std::string& reason) = 0;

  // Convenience over AllGather.
  absl::Status Barrier();
};

// Host memory for exchange buffers. From 2 MiB up it is 2 MiB-aligned and
// advised as transparent huge pages (MADV_HUGEPAGE; a hint, ignored where THP
// is off): a zero-copy transport (UCX's CMA) then pins and walks 512x fewer
// pages, which took large all-to-alls over shared memory from about 3 to 5 GB/s
// on our 2-core host (bench/dispatch_combine). Throws std::bad_alloc like new.
struct FreeHostBuffer {
  void operator()(std::byte* p) const;
};
using HostBuffer = std::unique_ptr<std::byte[], FreeHostBuffer>;
HostBuffer AllocateHostBuffer(size_t bytes);

}  // namespace joule::ep
