// A rendezvous for transport addresses through a shared directory, for ranks
// started without a coordinator: transport tests and benchmarks. Production
// workers exchange addresses through the coordinator's Rendezvous RPC.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace joule::ep {

// Writes `address` as <dir>/addr.<rank> (atomically, via rename).
absl::Status PublishAddress(const std::string& dir, int rank, const std::string& address);

// Waits (bounded) until every rank published, then returns the addresses by rank.
absl::StatusOr<std::vector<std::string>> CollectAddresses(const std::string& dir, int world_size,
                                                          absl::Duration timeout);

}  // namespace joule::ep
