// UCX transport between processes and hosts: shared memory, TCP, RDMA (and
// CUDA memory where UCX has it), chosen by UCX itself or by UCX_TLS.
//
// Bootstrap: Create() opens a UCP context and worker and exposes the worker
// address blob; the blobs of all ranks travel through the coordinator
// (Rendezvous) and Connect() makes endpoints to every peer.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/ep/transport.h"

namespace joule::ep {

struct UcxOptions {
  // Endpoints in UCP_ERR_HANDLING_MODE_PEER (with keepalive). UCX then uses
  // only transports that can report failures, which on one host leaves out
  // CMA, the zero-copy path for large messages over shared memory, and
  // costs 2-4x in all-to-all time (bench/dispatch_combine). Off by default
  // because with UCX 1.13 (Debian 12) it buys nothing measured: a killed
  // peer over TCP is reported as Unavailable within milliseconds in both
  // modes (the endpoint's error callback fires either way), and over shared
  // memory only the timeout (DeadlineExceeded) notices it in both modes
  // (ucx_transport_test's Killed* cases). Kept for UCX versions whose
  // shared-memory keepalive does report a dead peer.
  bool peer_error_handling = false;
  // Waiting for a peer in a collective: spin (yielding) this long without
  // progress, then sleep in naps of an eighth of the time waited so far. The
  // spin is CPU time, which energy meters charge; the naps add latency.
  absl::Duration spin_before_naps = absl::Microseconds(500);
  // Two-sided progress: a second UCP worker, driven by a thread of its own,
  // takes the receive side of every collective that receives at least
  // receive_thread_min_bytes, while the calling thread drives the sends. Over
  // TCP the kernel copies each byte once on the sending side and once on the
  // receiving side, and one thread doing both for an exchange moves about
  // half of what a ucx_perftest pair (a process per side) moves; with a spare
  // core per rank this thread gives the receive copies their own core. It
  // buys nothing where ranks already fill the cores (bench/dispatch_combine
  // README). Every rank of a group must agree: Connect refuses a mix.
  bool receive_thread = false;
  size_t receive_thread_min_bytes = size_t{256} << 10;
};

class UcxTransport : public Transport {
 public:
  // Name of the receive thread (UcxOptions::receive_thread), as /proc shows it.
  static constexpr char kReceiveThreadName[] = "joule-ucx-recv";

  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(int rank, int world_size,
                                                              const TransportOptions& options = {},
                                                              const UcxOptions& ucx = {});
  ~UcxTransport() override;

  // This rank's UCP worker address, to be published to the peers.
  virtual const std::string& address() const = 0;
  // Connects to every peer (addresses indexed by rank; this rank's own entry
  // is ignored) and completes a barrier so all endpoints are wired.
  virtual absl::Status Connect(const std::vector<std::string>& addresses) = 0;

 protected:
  UcxTransport() = default;
};

}  // namespace joule::ep
