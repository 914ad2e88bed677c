// Forming an NCCL group at the coordinator's rendezvous (joule-worker
// --transport nccl).
//
// Every rank sends a descriptor as its transport address (RendezvousRequest.
// transport_address), so that every rank receives every rank's and refuses the
// same mismatches with the same message. A descriptor is one line of text,
// fields separated by ';', each after the first `key=value`:
//
//   joule-nccl/1;host=gpu-node-3;device=cuda:1;pci=00000000:1B:00.0;id=<hex>
//
//   joule-nccl/1  the format and its version (a later one adds keys; unknown
//                 keys are ignored, another version is refused);
//   host          the host name;
//   device        the worker's --device as parsed ("cuda:1", "cpu");
//   pci           the GPU's PCI bus id as NVML spells it (empty on a CPU);
//   id            rank 0 only: the NCCL unique id (ncclGetUniqueId, 128 bytes)
//                 in hex. Rank 0 of each group makes a fresh one.
//
// Values never contain ';' (host names, device specs, bus ids and hex do not).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/ep/transport.h"

namespace joule::worker {

struct NcclRankDescriptor {
  std::string host;
  std::string device;      // "cuda:0"; "cpu" on a CPU worker
  std::string pci_bus_id;  // empty when unknown (a CPU worker)
  std::string unique_id;   // rank 0: the NCCL unique id bytes; others: empty
};

std::string EncodeNcclDescriptor(const NcclRankDescriptor& descriptor);
// InvalidArgument saying what is wrong (not a joule-nccl descriptor, another
// version, a bad field).
absl::StatusOr<NcclRankDescriptor> ParseNcclDescriptor(std::string_view text);

// The rendezvous verdict, the same on every rank (every rank sees every
// rank's descriptor, by transport rank): FailedPrecondition naming the ranks
// when a rank computes on a CPU ("--transport nccl needs --device cuda:N") or
// two ranks share one GPU; InvalidArgument for an unreadable descriptor or a
// rank 0 without a unique id. Otherwise rank 0's unique id.
absl::StatusOr<std::string> CheckNcclGroup(const std::vector<std::string>& descriptors);

// --- the NCCL transport, where this build has one (else the stubs say so) ---

// OK where this build has CUDA and NCCL (JOULE_HAVE_NCCL); else Unimplemented
// saying so, as are the two below.
absl::Status NcclTransportAvailable();
absl::StatusOr<std::string> MakeNcclUniqueId();
// ep::NcclTransport::Create: `rank` of `world` on CUDA device `device`.
absl::StatusOr<std::unique_ptr<ep::Transport>> CreateNcclTransport(
    int rank, int world, const std::string& unique_id, const ep::TransportOptions& options,
    int device);

}  // namespace joule::worker
