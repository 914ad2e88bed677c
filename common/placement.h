// Expert placement: which ranks hold which experts of every MoE layer.
// Shared by the coordinator (which computes it, coordinator/placement) and the
// workers (which load and route by it).
//
// Each expert has one or more replicas (ranks that hold its weights). The
// default is contiguous sharding, expert e on rank e / (num_experts / ranks)
// (experts need not divide evenly); redundant replicas of hot experts are added
// by EPLB from observed per-expert load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace joule {

struct Placement {
  int num_ranks = 0;
  int num_layers = 0;  // all decoder layers; dense layers have no experts (empty lists)
  int num_experts = 0;
  // replicas[layer][expert]: ranks holding that expert, no duplicates, non-empty.
  std::vector<std::vector<std::vector<int32_t>>> replicas;

  bool Holds(int rank, int layer, int expert) const;
  // Experts of `layer` held by `rank`, ascending.
  std::vector<int32_t> LocalExperts(int rank, int layer) const;
  // InvalidArgument when a layer or expert is missing, a rank is out of range,
  // or an expert has no replica.
  absl::Status Validate() const;
};

// Contiguous sharding, no replicas.
absl::StatusOr<Placement> ContiguousPlacement(int num_ranks, int num_layers, int num_experts);

// The replica that serves (token, expert) on `layer` when the expert has
// several: a replica on source_rank itself if there is one (no transfer),
// otherwise round-robin over the replicas by token index (offset by the source
// rank), which spreads one expert's tokens evenly and needs no coordination.
int32_t ChooseReplica(const Placement& p, int layer, int expert, int64_t token_index, int source_rank);

// The expert-parallel load imbalance, the figure EPLB lowers: the busiest rank's
// expert work over the mean rank's, where `load[layer][expert]` tokens routed to
// an expert are shared evenly by its replicas. 1: balanced; 0: no load (or a
// load that does not match the placement's shape).
double LoadImbalance(const Placement& p, const std::vector<std::vector<int64_t>>& load);

}  // namespace joule
