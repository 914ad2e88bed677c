#include "coordinator/placement/eplb.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace joule {

absl::StatusOr<Placement> RebalancePlacement(const Placement& base,
                                             const std::vector<std::vector<int64_t>>& load,
                                             int redundant_experts) {
  RETURN_IF_ERROR(Annotate(base.Validate(), "rebalance: base placement"));
  if (redundant_experts < 0) {
    return absl::InvalidArgumentError(absl::StrCat("rebalance: redundant_experts must not be negative, got ",
                                                   redundant_experts));
  }
  if (static_cast<int>(load.size()) != base.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("rebalance: load has ", load.size(),
                                                   " layers, the placement ", base.num_layers));
  }
  Placement out = base;
  for (int l = 0; l < base.num_layers; ++l) {
    auto& experts = out.replicas[l];
    if (experts.empty()) continue;  // dense layer
    const int E = base.num_experts;
    // Layers without observations (no traffic yet, or a worker that reports
    // only MoE layers) get no extra replicas.
    if (load[l].empty()) continue;
    if (static_cast<int>(load[l].size()) != E) {
      return absl::InvalidArgumentError(absl::StrCat("rebalance: load of layer ", l, " has ",
                                                     load[l].size(), " experts, expected ", E));
    }
    for (int e = 0; e < E; ++e) {
      if (load[l][e] < 0) {
        return absl::InvalidArgumentError(absl::StrCat("rebalance: load of layer ", l, " expert ", e,
                                                       " is negative (", load[l][e], ")"));
      }
    }
    for (int added = 0; added < redundant_experts; ++added) {
      // The hottest expert per replica that some rank does not hold yet. Ties
      // go to the expert with fewer replicas (so a layer without traffic gets
      // its replicas spread), then to the lower id: every caller computes the
      // same placement.
      int hot = -1;
      double hot_load = -1;
      for (int e = 0; e < E; ++e) {
        if (static_cast<int>(experts[e].size()) >= base.num_ranks) continue;
        const double per_replica = static_cast<double>(load[l][e]) / experts[e].size();
        if (per_replica > hot_load ||
            (per_replica == hot_load && experts[e].size() < experts[hot].size())) {
          hot = e;
          hot_load = per_replica;
        }
      }
      if (hot < 0) break;  // every expert is already on every rank
      // Expected rank load: each expert's tokens spread evenly over its replicas.
      std::vector<double> rank_load(base.num_ranks, 0.0);
      for (int e = 0; e < E; ++e) {
        const double share = static_cast<double>(load[l][e]) / experts[e].size();
        for (int32_t r : experts[e]) rank_load[r] += share;
      }
      int target = -1;
      for (int r = 0; r < base.num_ranks; ++r) {
        if (std::find(experts[hot].begin(), experts[hot].end(), r) != experts[hot].end()) continue;
        if (target < 0 || rank_load[r] < rank_load[target]) target = r;
      }
      experts[hot].push_back(target);
    }
  }
  RETURN_IF_ERROR(Annotate(out.Validate(), "rebalance: result"));
  return out;
}

absl::StatusOr<Placement> RemoveRank(const Placement& placement, int rank) {
  if (rank < 0 || rank >= placement.num_ranks) {
    return absl::InvalidArgumentError(absl::StrCat("rank: ", rank, " is out of range [0, ",
                                                   placement.num_ranks, ")"));
  }
  if (placement.num_ranks == 1) {
    return absl::InvalidArgumentError("rank: the placement's only rank cannot be removed");
  }
  Placement out = placement;
  out.num_ranks = placement.num_ranks - 1;
  for (auto& layer : out.replicas) {
    std::vector<int> held(out.num_ranks, 0);
    std::vector<int32_t> orphans;
    for (size_t e = 0; e < layer.size(); ++e) {
      std::vector<int32_t> kept;
      for (int32_t r : layer[e]) {
        if (r != rank) kept.push_back(r > rank ? r - 1 : r);
      }
      for (int32_t r : kept) ++held[r];
      if (kept.empty()) orphans.push_back(static_cast<int32_t>(e));
      layer[e] = std::move(kept);
    }
    for (int32_t e : orphans) {
      const int32_t to = static_cast<int32_t>(std::min_element(held.begin(), held.end()) - held.begin());
      layer[e] = {to};
      ++held[to];
    }
  }
  return out;
}

}  // namespace joule
