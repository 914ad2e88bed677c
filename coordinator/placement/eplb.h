// Expert-parallel load balancing: redundant replicas of hot experts.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/placement.h"

namespace joule {

// Starts from `base` and adds `redundant_experts` extra replicas per MoE
// layer, one at a time to the expert with the highest load per replica, each
// on the least-loaded rank that does not hold it yet.
// load[layer][expert] = tokens routed there since the last rebalance.
absl::StatusOr<Placement> RebalancePlacement(const Placement& base,
                                             const std::vector<std::vector<int64_t>>& load,
                                             int redundant_experts);

// The placement without `rank` (it died or was drained), over the ranks left,
// renumbered: ranks above it move down by one. Every replica on a live rank
// stays where it is (nothing to load); an expert whose only holder was `rank`
// goes to the live rank holding the fewest experts of that layer (ties: the
// lower rank), which loads it. InvalidArgument when `rank` is out of range or
// is the only rank.
absl::StatusOr<Placement> RemoveRank(const Placement& placement, int rank);

}  // namespace joule
