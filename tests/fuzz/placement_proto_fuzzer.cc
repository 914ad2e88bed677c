// Placement messages (common/placement_proto.h): the joule.v1.Placement a
// worker receives at registration and with every rebalance. Input: one byte
// for the model's routed experts (1..16), one for its decoder layers (1..8),
// one whose bits mark the MoE layers, then the message's wire bytes. A
// placement PlacementFromProto accepts must validate, keep every replica on a
// rank in range, route every (token, expert) to a rank that holds the expert,
// and come back unchanged through PlacementToProto.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/placement.h"
#include "common/placement_proto.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const int num_experts = 1 + data[0] % 16;
  const int num_layers = 1 + data[1] % 8;
  std::vector<bool> moe_layer(num_layers);
  for (int l = 0; l < num_layers; ++l) moe_layer[l] = (data[2] >> l) & 1;
  joule::v1::Placement message;
  if (!message.ParseFromArray(data + 3, static_cast<int>(size - 3))) return 0;

  absl::StatusOr<joule::Placement> placement = joule::PlacementFromProto(message, num_experts, moe_layer);
  if (!placement.ok()) {
    FUZZ_CHECK(placement.status().code() == absl::StatusCode::kInvalidArgument, "%s",
               placement.status().ToString().c_str());
    return 0;
  }
  const joule::Placement& p = *placement;
  FUZZ_CHECK(p.Validate().ok(), "accepted but invalid: %s", p.Validate().ToString().c_str());
  FUZZ_CHECK(p.num_layers == num_layers && p.num_experts == num_experts, "shape changed");
  const int ranks_to_visit = p.num_ranks < 64 ? p.num_ranks : 64;
  for (int l = 0; l < num_layers; ++l) {
    FUZZ_CHECK(p.replicas[l].empty() == !moe_layer[l], "layer %d: MoE %d but %zu experts", l, int(moe_layer[l]),
               p.replicas[l].size());
    if (!moe_layer[l]) continue;
    for (int e = 0; e < num_experts; ++e) {
      for (int source = 0; source < ranks_to_visit; ++source) {
        for (int64_t token = 0; token < 3; ++token) {
          const int32_t rank = joule::ChooseReplica(p, l, e, token, source);
          FUZZ_CHECK(p.Holds(rank, l, e), "layer %d expert %d routed to rank %d, which does not hold it", l, e,
                     rank);
        }
      }
    }
    size_t held = 0;
    for (int rank = 0; rank < ranks_to_visit; ++rank) held += p.LocalExperts(rank, l).size();
    if (p.num_ranks <= 64) {
      size_t replicas = 0;
      for (const auto& ranks : p.replicas[l]) replicas += ranks.size();
      FUZZ_CHECK(held == replicas, "layer %d: ranks hold %zu experts, the placement lists %zu replicas", l, held,
                 replicas);
    }
  }
  const joule::v1::Placement again = joule::PlacementToProto(p, message.epoch());
  absl::StatusOr<joule::Placement> round_trip = joule::PlacementFromProto(again, num_experts, moe_layer);
  FUZZ_CHECK(round_trip.ok(), "its own wire form is refused: %s", round_trip.status().ToString().c_str());
  FUZZ_CHECK(round_trip->replicas == p.replicas && round_trip->num_ranks == p.num_ranks, "round trip changed it");
  return 0;
}
