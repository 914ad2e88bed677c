// Whether nothing listens at a worker's endpoint any more. A silent rank's
// status probe can fail for many reasons (a frozen process, a slow host, a
// partition), and those are judged once the heartbeat limit passes; but a
// host that answers a TCP connect with a refusal has no server at that port:
// the worker process is gone, and waiting for the limit only delays the
// verdict.
#pragma once

#include <string>

#include "absl/time/time.h"

namespace joule::cluster {

// True only when `endpoint` ("IP:PORT", "[IPV6]:PORT") refused a TCP
// connection (ECONNREFUSED) within `timeout`. False when it accepted, did not
// answer in time, failed otherwise, or is not a numeric address (a host name
// would need a DNS query that can block): no conclusion.
bool EndpointRefuses(const std::string& endpoint, absl::Duration timeout);

}  // namespace joule::cluster
