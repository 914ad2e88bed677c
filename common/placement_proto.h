// Conversions between joule::Placement (common/placement.h) and its wire form
// joule.v1.Placement, which lists MoE layers only and carries the epoch. The
// coordinator sends placements and the workers receive them through these.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/placement.h"
#include "proto/joule/v1/cluster.pb.h"

namespace joule {

// Dense layers (no replicas) are left off the wire.
v1::Placement PlacementToProto(const Placement& placement, uint64_t epoch);

// `num_experts`: routed experts per MoE layer of the model; `moe_layer`: one
// entry per decoder layer, true for MoE layers. The result spans every decoder
// layer (dense ones empty). InvalidArgument naming the field when the message
// does not fit the model (num_experts, a layer that is out of range, dense,
// listed twice or missing) or fails Placement::Validate.
absl::StatusOr<Placement> PlacementFromProto(const v1::Placement& placement, int num_experts,
                                             const std::vector<bool>& moe_layer);

}  // namespace joule
