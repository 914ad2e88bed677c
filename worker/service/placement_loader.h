// Turns a placement from the coordinator into one this rank can run.
//
// When a placement gives this rank experts it does not hold (EPLB added a
// replica here), their weights are loaded before the placement is offered to
// the runtime: a fresh ModelWeights over the same mmapped checkpoint holding
// exactly the experts the placement needs, so the step loop only swaps
// executors between steps. Placements that need nothing new are applied with
// ExpertParallelExecutor::SetPlacement on the weights already held.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/placement.h"
#include "proto/joule/v1/cluster.pb.h"
#include "worker/model/config.h"
#include "worker/service/worker_runtime.h"

namespace joule::worker {

class PlacementLoader {
 public:
  // `initial`: the placement the rank's weights were loaded for.
  PlacementLoader(std::string model_dir, ModelConfig config, int rank, int world_size,
                  const Placement& initial);

  // InvalidArgument when the placement does not fit the model or the world;
  // the load error when new experts cannot be read.
  absl::StatusOr<PreparedPlacement> Prepare(const v1::Placement& placement);

  // This rank is `rank` of `world_size` from now on (a new expert-parallel
  // group); the experts it holds stay held.
  void Regroup(int rank, int world_size) {
    rank_ = rank;
    world_size_ = world_size;
  }

 private:
  const std::string model_dir_;
  const ModelConfig config_;
  int rank_;
  int world_size_;
  // Experts the newest prepared weights hold, [layer][expert].
  std::vector<std::vector<bool>> held_;
};

}  // namespace joule::worker
