#include "common/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace joule {

bool Placement::Holds(int rank, int layer, int expert) const {
  if (layer < 0 || layer >= static_cast<int>(replicas.size())) return false;
  const auto& experts = replicas[layer];
  if (expert < 0 || expert >= static_cast<int>(experts.size())) return false;
  const auto& ranks = experts[expert];
  return std::find(ranks.begin(), ranks.end(), rank) != ranks.end();
}

std::vector<int32_t> Placement::LocalExperts(int rank, int layer) const {
  std::vector<int32_t> out;
  if (layer < 0 || layer >= static_cast<int>(replicas.size())) return out;
  const auto& experts = replicas[layer];
  for (int e = 0; e < static_cast<int>(experts.size()); ++e) {
    if (std::find(experts[e].begin(), experts[e].end(), rank) != experts[e].end()) out.push_back(e);
  }
  return out;
}

absl::Status Placement::Validate() const {
  if (num_ranks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("placement: num_ranks must be positive, got ", num_ranks));
  }
  if (num_layers < 0 || num_experts < 0) {
    return absl::InvalidArgumentError(absl::StrCat("placement: num_layers (", num_layers,
                                                   ") and num_experts (", num_experts,
                                                   ") must not be negative"));
  }
  if (static_cast<int>(replicas.size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("placement: has ", replicas.size(),
                                                   " layers, expected num_layers = ", num_layers));
  }
  for (int l = 0; l < num_layers; ++l) {
    const auto& experts = replicas[l];
    if (experts.empty()) continue;  // a dense layer
    if (static_cast<int>(experts.size()) != num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " lists ", experts.size(),
                                                     " experts, expected num_experts = ", num_experts,
                                                     " (or none for a dense layer)"));
    }
    for (int e = 0; e < num_experts; ++e) {
      const auto& ranks = experts[e];
      if (ranks.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: layer ", l, " expert ", e, " has no replica"));
      }
      for (size_t i = 0; i < ranks.size(); ++i) {
        if (ranks[i] < 0 || ranks[i] >= num_ranks) {
          return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " expert ", e,
                                                         " is placed on rank ", ranks[i],
                                                         ", outside [0, ", num_ranks, ")"));
        }
        if (std::find(ranks.begin(), ranks.begin() + i, ranks[i]) != ranks.begin() + i) {
          return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " expert ", e,
                                                         " lists rank ", ranks[i], " twice"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Placement> ContiguousPlacement(int num_ranks, int num_layers, int num_experts) {
  if (num_ranks < 1 || num_layers < 0 || num_experts < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "contiguous placement needs num_ranks >= 1, num_layers >= 0 and num_experts >= 1 (got ",
        num_ranks, ", ", num_layers, ", ", num_experts, ")"));
  }
  Placement p;
  p.num_ranks = num_ranks;
  p.num_layers = num_layers;
  p.num_experts = num_experts;
  // Expert e goes to rank floor(e * R / E): contiguous blocks whose sizes differ
  // by at most one when E % R != 0, and exactly e / (E / R) when R divides E.
  // With fewer experts than ranks some ranks hold none (they still run
  // attention for their own requests; EPLB can give them replicas).
  std::vector<std::vector<int32_t>> layer(num_experts);
  for (int e = 0; e < num_experts; ++e) {
    layer[e] = {static_cast<int32_t>(static_cast<int64_t>(e) * num_ranks / num_experts)};
  }
  p.replicas.assign(num_layers, layer);
  return p;
}

int32_t ChooseReplica(const Placement& p, int layer, int expert, int64_t token_index, int source_rank) {
  const std::vector<int32_t>& ranks = p.replicas[layer][expert];
  if (ranks.size() == 1) return ranks[0];
  for (int32_t r : ranks) {
    if (r == source_rank) return r;
  }
  const uint64_t n = ranks.size();
  const uint64_t i = (static_cast<uint64_t>(token_index) + static_cast<uint64_t>(source_rank)) % n;
  return ranks[i];
}

double LoadImbalance(const Placement& p, const std::vector<std::vector<int64_t>>& load) {
  if (p.num_ranks <= 0 || load.size() != p.replicas.size()) return 0;
  std::vector<double> work(p.num_ranks, 0.0);
  for (size_t l = 0; l < load.size(); ++l) {
    if (load[l].empty()) continue;  // a dense layer
    if (load[l].size() != p.replicas[l].size()) return 0;
    for (size_t e = 0; e < load[l].size(); ++e) {
      const std::vector<int32_t>& holders = p.replicas[l][e];
      for (int32_t r : holders) work[r] += static_cast<double>(load[l][e]) / holders.size();
    }
  }
  double total = 0, busiest = 0;
  for (double w : work) {
    total += w;
    busiest = std::max(busiest, w);
  }
  return total > 0 ? busiest / (total / p.num_ranks) : 0;
}

}  // namespace joule
