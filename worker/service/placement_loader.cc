#include "worker/service/placement_loader.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/service/convert.h"

namespace joule::worker {

PlacementLoader::PlacementLoader(std::string model_dir, ModelConfig config, int rank,
                                 int world_size, const Placement& initial)
    : model_dir_(std::move(model_dir)), config_(std::move(config)), rank_(rank),
      world_size_(world_size) {
  held_.assign(config_.num_layers, std::vector<bool>(config_.num_experts, false));
  for (int l = 0; l < config_.num_layers; ++l) {
    for (int32_t e : initial.LocalExperts(rank_, l)) held_[l][e] = true;
  }
}

absl::StatusOr<PreparedPlacement> PlacementLoader::Prepare(const v1::Placement& message) {
  ASSIGN_OR_RETURN(Placement placement, PlacementFromProto(message, config_));
  if (placement.num_ranks != world_size_) {
    return absl::InvalidArgumentError(absl::StrCat("placement.num_ranks: ", placement.num_ranks,
                                                   " but the cluster has ", world_size_, " ranks"));
  }
  PreparedPlacement out;
  out.epoch = message.epoch();
  std::vector<std::vector<bool>> needed(config_.num_layers,
                                        std::vector<bool>(config_.num_experts, false));
  int missing = 0;
  for (int l = 0; l < config_.num_layers; ++l) {
    for (int32_t e : placement.LocalExperts(rank_, l)) {
      needed[l][e] = true;
      if (!held_[l][e]) ++missing;
    }
  }
  if (missing > 0) {
    JOULE_LOG(Info) << "rank " << rank_ << ": placement epoch " << out.epoch << " adds " << missing
                    << " expert(s) to this rank; loading their weights";
    WeightLoadOptions load;
    load.owns_expert = [needed](int layer, int expert) { return needed[layer][expert]; };
    auto weights = ModelWeights::Load(model_dir_, load);
    if (!weights.ok()) {
      return Annotate(weights.status(),
                      absl::StrCat("loading the experts of placement epoch ", out.epoch));
    }
    out.weights = std::move(*weights);
    held_ = std::move(needed);
  }
  out.placement = std::move(placement);
  return out;
}

}  // namespace joule::worker
