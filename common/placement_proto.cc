#include "common/placement_proto.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace joule {

v1::Placement PlacementToProto(const Placement& placement, uint64_t epoch) {
  v1::Placement out;
  out.set_num_ranks(placement.num_ranks);
  out.set_num_experts(placement.num_experts);
  out.set_epoch(epoch);
  for (int l = 0; l < static_cast<int>(placement.replicas.size()); ++l) {
    if (placement.replicas[l].empty()) continue;  // dense layer
    v1::LayerPlacement* layer = out.add_layers();
    layer->set_layer(l);
    for (const std::vector<int32_t>& ranks : placement.replicas[l]) {
      layer->add_experts()->mutable_ranks()->Add(ranks.begin(), ranks.end());
    }
  }
  return out;
}

absl::StatusOr<Placement> PlacementFromProto(const v1::Placement& placement, int num_experts,
                                             const std::vector<bool>& moe_layer) {
  const int num_layers = static_cast<int>(moe_layer.size());
  if (placement.num_experts() != num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("placement.num_experts: ", placement.num_experts(),
                                                   " but the model has ", num_experts));
  }
  Placement p;
  p.num_ranks = placement.num_ranks();
  p.num_layers = num_layers;
  p.num_experts = num_experts;
  p.replicas.assign(num_layers, {});
  for (const v1::LayerPlacement& layer : placement.layers()) {
    const int l = layer.layer();
    if (l < 0 || l >= num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement.layers: layer ", l, " is out of range [0, ", num_layers, ")"));
    }
    if (!moe_layer[l]) {
      return absl::InvalidArgumentError(absl::StrCat("placement.layers: layer ", l, " is not a MoE layer of the model"));
    }
    if (!p.replicas[l].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("placement.layers: layer ", l, " listed twice"));
    }
    if (layer.experts_size() != num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("placement.layers[layer ", l, "].experts: ",
                                                     layer.experts_size(), " entries, expected ", num_experts));
    }
    for (const v1::ExpertReplicas& e : layer.experts()) {
      p.replicas[l].emplace_back(e.ranks().begin(), e.ranks().end());
    }
  }
  for (int l = 0; l < num_layers; ++l) {
    if (moe_layer[l] && p.replicas[l].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("placement.layers: MoE layer ", l, " is missing"));
    }
  }
  RETURN_IF_ERROR(p.Validate());  // its messages start with "placement:"
  return p;
}

}  // namespace joule
