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
#include "worker/ep/transport.h"

namespace joule::ep {

struct UcxOptions {
  // Endpoints in UCP_ERR_HANDLING_MODE_PEER: a peer whose connection fails
  // is reported as Unavailable naming it (TCP notices a killed process at
  // once). UCX then uses only transports that can report failures, which on
  // one host leaves out CMA, the zero-copy path for large messages over
  // shared memory. false lets UCX use it (the dispatch/combine benchmark
  // shows the gain); a dead peer then surfaces as DeadlineExceeded after the
  // timeout, or as Unavailable where the transport still reports it.
  bool peer_error_handling = true;
};

class UcxTransport : public Transport {
 public:
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
