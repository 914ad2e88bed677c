#include "worker/ep/lockstep.h"

#include <vector>

#include "common/status.h"

namespace joule::ep {

absl::StatusOr<LockstepStepper::Result> LockstepStepper::Step() {
  // Planning first fixes this rank's token count; a failed exchange leaves
  // the plan pending, and the next Step() offers the same plan again.
  const int64_t mine = engine_->PlanStep();
  std::vector<int64_t> all(transport_->world_size(), 0);
  RETURN_IF_ERROR(Annotate(transport_->AllGather(&mine, sizeof(mine), all.data()),
                           "lockstep step: token count exchange"));
  Result result;
  for (int64_t n : all) result.global_tokens += n;
  // The step runs anyway: resting paced sequences take their next token in it.
  if (mine == 0 && result.global_tokens > 0) engine_->RideAlong();
  // Every rank sees the same counts: either all run the step (the idle ones
  // over an empty batch, to serve their experts) or none runs a forward pass.
  ASSIGN_OR_RETURN(result.step, engine_->RunPlannedStep(/*run_empty=*/result.global_tokens > 0));
  return result;
}

}  // namespace joule::ep
