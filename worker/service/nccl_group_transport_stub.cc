// A build without CUDA and NCCL: no NCCL transport (nccl_group.h).
#include "worker/service/nccl_group.h"

namespace joule::worker {
namespace {

absl::Status NoNccl() {
  return absl::UnimplementedError(
      "--transport nccl: this joule-worker has no NCCL transport (CPU build); use --transport ucx");
}

}  // namespace

absl::Status NcclTransportAvailable() { return NoNccl(); }

absl::StatusOr<std::string> MakeNcclUniqueId() { return NoNccl(); }

absl::StatusOr<std::unique_ptr<ep::Transport>> CreateNcclTransport(int, int, const std::string&,
                                                                   const ep::TransportOptions&,
                                                                   int) {
  return NoNccl();
}

}  // namespace joule::worker
