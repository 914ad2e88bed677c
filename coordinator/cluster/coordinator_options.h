// joule-coordinator's configuration, declared once: each option's name, type,
// default and help live in the table below. Values come from the command line
// (--name VALUE or --name=VALUE), else from the environment
// (JOULE_COORDINATOR_NAME, dashes as underscores), else the default; the
// result is printed at start-up. common/options.h does the reading.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/options.h"

namespace joule::cluster {

// X(type, field, default, help); the flag is --field with '_' written '-'.
#define JOULE_COORDINATOR_OPTIONS(X)                                                              \
  X(std::string, model, "", "checkpoint directory (config.json + *.safetensors)")                \
  X(int, workers, 1, "expert-parallel world size: the number of worker ranks")                    \
  X(std::string, host, "0.0.0.0", "address to listen on")                                        \
  X(int, port, 0, "port to listen on; 0 picks a free one (see --port-file)")                     \
  X(std::string, port_file, "", "write the bound port to this file once serving")                \
  X(std::string, transport, "ucx", "worker transport: ucx | nccl | inproc")                      \
  X(int, redundant_experts, 0, "extra expert replicas per MoE layer that Rebalance adds (EPLB)")  \
  X(int, rebalance_interval_s, 0, "rebalance from observed expert load this often; 0: only on request") \
  X(int, step_timeout_ms, 10000,                                                                  \
    "how long workers wait for their peers in one step (sent to workers at registration); "     \
    "bounds how long a dead peer stalls the others")                                              \
  X(int, heartbeat_ms, 500, "worker heartbeat interval; a rank silent for 3 intervals is dead")   \
  X(int, startup_timeout_s, 600,                                                                  \
    "a registered worker that has not heartbeated (still loading) for this long is dead")       \
  X(int, request_timeout_s, 600, "longest one request may run on a worker")

struct CoordinatorOptions {
  JOULE_COORDINATOR_OPTIONS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {JOULE_COORDINATOR_OPTIONS(JOULE_OPTION_BIND)}; }
  // InvalidArgument naming the flag when a value is out of range.
  absl::Status Validate() const;
  // One line per option, "--name=value", for the start-up log.
  std::string ToString() const;
};

// Environment, then argv, then Validate. InvalidArgument naming the flag on
// unknown flags or bad values; "--help" gives Cancelled whose message is the
// usage text (IsHelpRequest).
absl::StatusOr<CoordinatorOptions> ParseCoordinatorOptions(int argc, const char* const* argv);

}  // namespace joule::cluster
