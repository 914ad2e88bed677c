#include "coordinator/cluster/coordinator_options.h"

#include "absl/strings/str_cat.h"

namespace joule::cluster {

absl::Status CoordinatorOptions::Validate() const {
  if (model.empty()) return absl::InvalidArgumentError("--model: required (checkpoint directory)");
  if (workers < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--workers: must be at least 1, got ", workers));
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port: must be in [0, 65535], got ", port));
  }
  if (transport != "ucx" && transport != "nccl" && transport != "inproc") {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport: must be ucx, nccl or inproc, got '", transport, "'"));
  }
  if (redundant_experts < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--redundant-experts: must not be negative, got ", redundant_experts));
  }
  if (heartbeat_ms < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--heartbeat-ms: must be positive, got ", heartbeat_ms));
  }
  if (step_timeout_ms < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--step-timeout-ms: must be positive, got ", step_timeout_ms));
  }
  if (startup_timeout_s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--startup-timeout-s: must be positive, got ", startup_timeout_s));
  }
  if (request_timeout_s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--request-timeout-s: must be positive, got ", request_timeout_s));
  }
  if (rebalance_interval_s < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rebalance-interval-s: must not be negative, got ", rebalance_interval_s));
  }
  return absl::OkStatus();
}

std::string CoordinatorOptions::ToString() const { return DescribeConfig(*this); }

absl::StatusOr<CoordinatorOptions> ParseCoordinatorOptions(int argc, const char* const* argv) {
  return ParseConfig<CoordinatorOptions>("usage: joule-coordinator --model DIR --workers N [flags]",
                                         "JOULE_COORDINATOR_", argc, argv);
}

}  // namespace joule::cluster
