// Process-level numbers a worker reports (Status RPC, heartbeats).
#pragma once

#include <cstdint>

namespace joule::worker {

// Resident set size of this process in bytes (/proc/self/statm); 0 if unknown.
int64_t ResidentBytes();

}  // namespace joule::worker
