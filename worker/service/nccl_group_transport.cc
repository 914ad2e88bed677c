// The NCCL transport of a CUDA + NCCL build (nccl_group.h; the CPU build
// compiles nccl_group_transport_stub.cc instead).
#include <utility>

#include "worker/ep/nccl_transport.h"
#include "worker/service/nccl_group.h"

namespace joule::worker {

absl::Status NcclTransportAvailable() { return absl::OkStatus(); }

absl::StatusOr<std::string> MakeNcclUniqueId() { return ep::NcclTransport::MakeUniqueId(); }

absl::StatusOr<std::unique_ptr<ep::Transport>> CreateNcclTransport(
    int rank, int world, const std::string& unique_id, const ep::TransportOptions& options,
    int device) {
  absl::StatusOr<std::unique_ptr<ep::NcclTransport>> nccl =
      ep::NcclTransport::Create(rank, world, unique_id, options, device);
  if (!nccl.ok()) return nccl.status();
  return std::unique_ptr<ep::Transport>(*std::move(nccl));
}

}  // namespace joule::worker
