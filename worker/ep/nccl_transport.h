// NCCL transport: collectives on device memory between GPUs, one rank per
// GPU, through a nonblocking NCCL communicator so that a missing or dead peer
// becomes an error (the communicator is aborted) instead of a hang.
//
// Buffers are device pointers (memory_kind() == kDevice) and must be ready
// when a collective is called (the caller synchronized the stream that wrote
// them); each call returns once the data has arrived. Counts must agree
// pairwise: NCCL cannot detect a mismatch, so exchange them first with
// AllGather as the contract says. A call that moves no bytes returns at once
// without meeting the peers (use Barrier to synchronize). Built only when CUDA and NCCL are found
// (JOULE_HAVE_NCCL).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/ep/transport.h"

namespace joule::ep {

class NcclTransport : public Transport {
 public:
  // A fresh NCCL unique id (ncclGetUniqueId) as bytes: rank 0 makes it and
  // publishes it to the others through the coordinator.
  static absl::StatusOr<std::string> MakeUniqueId();

  // Joins the communicator named by `unique_id` as `rank` of `world_size` on
  // CUDA device `device` (-1: the calling thread's current device). Waits
  // for every rank at most options.timeout.
  static absl::StatusOr<std::unique_ptr<NcclTransport>> Create(int rank, int world_size,
                                                               const std::string& unique_id,
                                                               const TransportOptions& options = {},
                                                               int device = -1);
  ~NcclTransport() override;

  MemoryKind memory_kind() const override { return MemoryKind::kDevice; }
  std::string name() const override { return "nccl"; }

 protected:
  NcclTransport() = default;
};

}  // namespace joule::ep
